"""`dsv generate` streams text as a reader wants it: reasoning then answer with --thinking, no special
tokens, whole multi-byte characters, a final newline; --show-special prints the raw text.

The checkpoint is the tiny preset with its attention and MLP outputs zeroed, so the residual stream
is the current token's embedding, and with one-hot embeddings and a matching LM head greedy
decoding follows a chain of token ids chosen here: a real model file whose output is known.

Run: ``pytest packages/core/tests/test_core_generate_stream.py``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv.core.tokenizer import EOS, THINK_END, THINK_START, Tokenizer

REASONING = "é日"
ANSWER = "ж 🙂"


def _scripted(src: Path, dest: Path, chain: list[int]) -> Path:
    """Copy of ``src`` whose greedy continuation of ``chain[0]`` is ``chain[1:]``."""
    shutil.copytree(src, dest)
    files = list(dest.glob("*.safetensors"))
    states = {f: load_file(str(f)) for f in files}
    hidden = next(t for s in states.values() for k, t in s.items() if k == "model.embed_tokens.weight").shape[1]
    assert len(chain) <= hidden and len(set(chain)) == len(chain), "the chain must be distinct ids, one per dim"
    for state in states.values():
        for k, t in state.items():
            if k.endswith(("o_proj.weight", "down_proj.weight")):
                state[k] = torch.zeros_like(t)  # no layer writes into the residual stream
            elif k == "model.embed_tokens.weight":
                emb = torch.zeros_like(t)
                for j, tid in enumerate(chain):
                    emb[tid, j] = 1.0
                state[k] = emb
            elif k == "lm_head.weight":
                head = torch.zeros_like(t)
                for j, nxt in enumerate(chain[1:]):
                    head[nxt, j] = 50.0  # token chain[j] (one-hot on dim j) is followed by chain[j + 1]
                state[k] = head
    for f, state in states.items():
        save_file(state, str(f))
    return dest


@pytest.fixture(scope="module")
def scripted(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tok = Tokenizer.load(tiny_checkpoint)
    end, eos, start = (tok.token_to_id(s) for s in (THINK_END, EOS, THINK_START))
    chain = [start, *tok.encode(REASONING), end, *tok.encode(ANSWER), eos]
    assert start is not None and end is not None
    # the multi-byte characters must be split over tokens for the test to mean something
    assert any("\ufffd" in tok.decode([i]) for i in tok.encode(REASONING + ANSWER))
    return _scripted(tiny_checkpoint, tmp_path_factory.mktemp("scripted") / "m", chain)


def _generate(ckpt: Path, *flags: str, prompt: str = "hi") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dsv.cli.main", "generate", str(ckpt), "-p", prompt, "--temperature", "0",
         "--max-new-tokens", "40", *flags],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_thinking_streams_reasoning_then_answer_without_special_tokens(scripted: Path) -> None:
    r = _generate(scripted, "--thinking")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{REASONING}\n\n{ANSWER}\n"
    assert "\ufffd" not in r.stdout and "finish_reason=stop" in r.stderr


def test_show_special_prints_the_raw_text(scripted: Path) -> None:
    r = _generate(scripted, "--thinking", "--show-special")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{REASONING}{THINK_END}{ANSWER}{EOS}\n"


def test_plain_generation_hides_special_tokens(scripted: Path) -> None:
    # the prompt ends inside the chain (the last byte of "é"), so greedy decoding continues it
    r = _generate(scripted, prompt="é")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{REASONING[1:]}{ANSWER}\n"
    r = _generate(scripted, "--show-special", prompt="é")
    assert r.stdout == f"{REASONING[1:]}{THINK_END}{ANSWER}{EOS}\n"
