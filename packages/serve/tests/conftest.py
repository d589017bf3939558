"""Fixtures for the dsv-serve tests: tiny checkpoints and a real uvicorn server on 127.0.0.1.

``trained_ckpt`` ships its own short tools prose as ``encoding/encoding_dsv32.py`` (read by
``Templates.from_checkpoint`` with ast, as for an official checkpoint) so prompts stay short, and is
a tiny model briefly trained here (teacher forcing, a few hundred Adam steps)
to answer three fixed conversations exactly: a thinking-mode greeting, a tool call (DSML) for a
weather question with tools, and an answer after the tool result. Greedy decoding then produces
those strings for real, so the tests exercise the model, the engine and the parser honestly.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dsv.core.chat import Templates, encode_assistant_completion, encode_messages

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
ENCODER_FILE = 'TOOLS_SYSTEM_TEMPLATE = "## Tools\\n<functions>\\n{tool_schemas}\\n</functions>\\n"\n'

CALL = {
    "id": "call_x",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
AFTER_TOOL = [*ASK, {"role": "assistant", "content": "", "tool_calls": [CALL]},
              {"role": "tool", "tool_call_id": "call_x", "content": "sunny, 21 C"}]  # fmt: skip
GREET = [{"role": "user", "content": "hi"}]

# (messages, thinking, tools, assistant message the model must produce)
SCRIPT: list[tuple[list[dict[str, Any]], bool, list[dict[str, Any]] | None, dict[str, Any]]] = [
    (GREET, True, None, {"reasoning_content": "say hello", "content": "Hello there!"}),
    (ASK, False, [WEATHER_TOOL], {"content": "", "tool_calls": [CALL]}),
    (AFTER_TOOL, False, [WEATHER_TOOL], {"content": "It is sunny in Paris."}),
]


def _train(model: torch.nn.Module, tok: Any, templates: Templates) -> None:
    pairs = []
    for messages, thinking, tools, answer in SCRIPT:
        prompt_text = encode_messages(messages, thinking=thinking, tools=tools, templates=templates)
        prompt = tok.encode(prompt_text, add_bos=False)
        target = tok.encode(
            encode_assistant_completion(answer, thinking=thinking, templates=templates), add_bos=False
        )
        pairs.append((torch.tensor([prompt + target]), len(prompt)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    torch.manual_seed(0)
    model.train()
    for step in range(800):
        loss = torch.zeros(())
        for ids, n_prompt in pairs:
            logits = model(ids[:, :-1]).logits[0, n_prompt - 1 :]
            loss = loss + torch.nn.functional.cross_entropy(logits, ids[0, n_prompt:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 24:
            with torch.no_grad():
                ok = all(
                    bool((model(ids[:, :-1]).logits[0, n - 1 :].argmax(-1) == ids[0, n:]).all())
                    for ids, n in pairs
                )
            if ok:
                break
    model.eval()
    assert ok, "the fixture model did not learn its script"


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny checkpoint with a trained BPE tokenizer."""
    from dsv.core import presets
    from dsv.core.checkpoint import save_pretrained
    from dsv.core.model import DSVForCausalLM
    from dsv.core.tokenizer import default_corpus, train_bpe

    torch.manual_seed(0)
    cfg = presets.tiny()
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_pretrained(DSVForCausalLM(cfg), train_bpe(default_corpus(), cfg.vocab_size), out)
    return out


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dsv.core import presets
    from dsv.core.checkpoint import save_pretrained
    from dsv.core.model import DSVForCausalLM
    from dsv.core.tokenizer import default_corpus, train_bpe

    torch.manual_seed(0)
    cfg = presets.tiny()
    tok = train_bpe(default_corpus(), cfg.vocab_size)
    out = tmp_path_factory.mktemp("ckpt") / "scripted"
    model = DSVForCausalLM(cfg)
    save_pretrained(model, tok, out)
    (out / "encoding").mkdir()
    (out / "encoding" / "encoding_dsv32.py").write_text(ENCODER_FILE, encoding="utf-8")
    templates = Templates.from_checkpoint(out)
    assert templates.source != "dsv"
    _train(model, tok, templates)
    save_pretrained(model, tok, out)  # replaces the folder: put the encoder file back
    (out / "encoding").mkdir()
    (out / "encoding" / "encoding_dsv32.py").write_text(ENCODER_FILE, encoding="utf-8")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """uvicorn serving ``app`` in a thread on a free loopback port."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="session")
def trained_server(trained_ckpt: Path) -> Iterator[LiveServer]:
    from dsv.serve import load_native_app

    app = load_native_app(str(trained_ckpt), model_name="dsv-tiny", max_model_len=1024, api_key="sk-test",
                          num_blocks=256, block_size=16)  # fmt: skip
    with LiveServer(app) as server:
        yield server
