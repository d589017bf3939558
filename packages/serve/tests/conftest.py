"""Fixtures for the dsv-serve tests: tiny checkpoints and a real uvicorn server on 127.0.0.1.

``trained_ckpt`` ships its own short tools prose as ``encoding/encoding_dsv32.py`` (read by
``Templates.from_checkpoint`` with ast, as for an official checkpoint) so prompts stay short, and is
a one-layer model trained here (teacher forcing, usually under 60 Adam steps, a few seconds) to
answer three fixed conversations exactly: a thinking-mode greeting, a tool call (DSML) for a weather
question with tools, and an answer after the tool result. Greedy decoding then produces those
strings for real, so the tests exercise the model, the engine and the parser honestly.

Torch runs one intra-op thread here: the engine thread, uvicorn and the client threads share two
CPU cores, and with two intra-op threads each small matmul waits on a busy core (measured 20-50x
slower per forward on the shared CI machine).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
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


def _script_texts(templates: Templates) -> list[tuple[str, str]]:
    """(prompt, completion) strings of the script, encoded as the server encodes them."""
    return [
        (
            encode_messages(messages, thinking=thinking, tools=tools, templates=templates),
            encode_assistant_completion(answer, thinking=thinking, templates=templates),
        )
        for messages, thinking, tools, answer in SCRIPT
    ]


def _train(
    model: torch.nn.Module, tok: Any, pairs: list[tuple[str, str]], max_steps: int = 400, min_prob: float = 0.0
) -> None:
    """Teacher-force ``(prompt, completion)`` pairs until greedy decoding reproduces every completion
    (and, with ``min_prob``, gives every completion token at least that probability: a margin that
    carries over to prompts near the trained ones).

    The sequences go in one right-padded batch (causal attention: the padding after a
    sequence never reaches its positions), the loss covers completion tokens only, and training
    stops at the first step where every completion token is the argmax.
    """
    seqs = [(tok.encode(p), tok.encode(a)) for p, a in pairs]
    width = max(len(p) + len(a) for p, a in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    target = torch.full((len(seqs), width - 1), -100)
    for row, (p, a) in enumerate(seqs):
        ids[row, : len(p) + len(a)] = torch.tensor(p + a)
        target[row, len(p) - 1 : len(p) + len(a) - 1] = torch.tensor(a)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(max_steps):
        logits = model(ids[:, :-1]).logits  # (rows, width - 1, V)
        if _learned(logits, target, min_prob):
            break
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits
    assert _learned(logits, target, min_prob), f"the fixture model did not learn its script in {max_steps} steps"


def _learned(logits: torch.Tensor, target: torch.Tensor, min_prob: float) -> bool:
    """Every scored target token is the argmax and has at least ``min_prob``."""
    scored = target != -100
    probs = logits.detach().softmax(-1)[scored].gather(-1, target[scored].unsqueeze(-1))
    return bool((logits.argmax(-1)[scored] == target[scored]).all()) and float(probs.min()) >= min_prob


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """One intra-op thread for this package's modules, given back after each module: a session-wide
    setting stayed in force for every later test of the worker (train, e2e)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def scripted_config() -> Any:
    """The fixture model: one MoE layer (DSA indexer included), hidden 64, a 384-token vocabulary."""
    from dsv.core import presets

    return presets.tiny(
        vocab_size=384, num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=0
    )


@pytest.fixture(scope="session")
def trained_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer model trained (a few seconds) to answer the script exactly under greedy decoding.

    Its BPE is trained on the script's own text, so the sequences are short and the few fixed
    token sequences are all the model has to learn.
    """
    from dsv.core.checkpoint import save_pretrained
    from dsv.core.model import DSVForCausalLM
    from dsv.core.tokenizer import default_corpus, train_bpe

    out = tmp_path_factory.mktemp("ckpt") / "scripted"
    probe = tmp_path_factory.mktemp("encoding")
    (probe / "encoding").mkdir()
    (probe / "encoding" / "encoding_dsv32.py").write_text(ENCODER_FILE, encoding="utf-8")
    templates = Templates.from_checkpoint(probe)
    assert templates.source != "dsv"
    script = [text for pair in _script_texts(templates) for text in pair]
    cfg = scripted_config()
    tok = train_bpe(script * 20 + default_corpus(200), cfg.vocab_size)
    torch.manual_seed(0)
    model = DSVForCausalLM(cfg)
    _train(model, tok, _script_texts(templates))
    save_pretrained(model, tok, out)
    (out / "encoding").mkdir()
    (out / "encoding" / "encoding_dsv32.py").write_text(ENCODER_FILE, encoding="utf-8")
    return out


# Agent turns after a tool result, as frameworks send them: instructions, a tool, the user's question,
# the call, its result. The model learns to close the turn there (a short answer and EOS) whatever
# came before, so an agent run ends with an answer instead of running to max_tokens.
AGENT_TURNS = [
    ("Use the tool.", "get_weather", {"city": "Paris"}, "Weather in Paris?", "sunny in Paris"),
    ("Use the tool.", "get_weather", {"city": "Rome"}, "Weather in Paris?", "sunny in Rome"),
    ("Answer briefly.", "add", {"a": 2, "b": 3}, "What is 2 + 3?", "5"),
    ("", "lookup", {"key": "x"}, "Look up x.", '{"value": 7}'),
    ("You are helpful.", "get_time", {}, "What time is it?", "12:00"),
    ("Use tools when needed.", "search", {"query": "dsv"}, "Find dsv.", "no results"),
]


def _agent_pairs() -> list[tuple[str, str]]:
    pairs = []
    for instructions, name, args, question, result in AGENT_TURNS:
        tool = {"type": "function", "function": {"name": name, "description": f"The {name} tool.",
                "parameters": {"type": "object", "properties": {k: {} for k in args}}}}  # fmt: skip
        call = {"id": "call_a", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
        messages = [*([{"role": "system", "content": instructions}] if instructions else []),
                    {"role": "user", "content": question}, {"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "call_a", "content": result}]  # fmt: skip
        pairs.append((encode_messages(messages, thinking=False, tools=[tool]),
                      encode_assistant_completion({"content": "Done."}, thinking=False)))  # fmt: skip
    return pairs


@pytest.fixture(scope="session")
def answering_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer model trained (a few seconds) to end an agent's turn after a tool result with
    ``Done.``: agent frameworks run a whole loop against it (call, result, final answer), where a
    random model's free answer never ends before the token limit."""
    from dsv.core.checkpoint import save_pretrained
    from dsv.core.model import DSVForCausalLM
    from dsv.core.tokenizer import default_corpus, train_bpe

    pairs = _agent_pairs()
    cfg = scripted_config()
    tok = train_bpe([text for pair in pairs for text in pair] * 10 + default_corpus(200), cfg.vocab_size)
    torch.manual_seed(0)
    model = DSVForCausalLM(cfg)
    _train(model, tok, pairs, min_prob=0.95)
    out = tmp_path_factory.mktemp("ckpt") / "answering"
    save_pretrained(model, tok, out)
    return out


@pytest.fixture(scope="session")
def script() -> SimpleNamespace:
    """The script's messages and tool for the tests (test modules do not import conftest: with a
    conftest.py in every test folder, which one ``import conftest`` finds depends on collection order)."""
    return SimpleNamespace(ASK=ASK, CALL=CALL, GREET=GREET, WEATHER_TOOL=WEATHER_TOOL, AFTER_TOOL=AFTER_TOOL)


@pytest.fixture(scope="session")
def live_server() -> type[LiveServer]:
    """The :class:`LiveServer` class: ``with live_server(app) as server: server.url``."""
    return LiveServer


@pytest.fixture
def reserve_port() -> Iterator[Callable[[], int]]:
    """``reserve_port()``: a loopback port kept for this test, for a server started in a subprocess.

    The port stays bound (address reuse on, never listening) until the test ends, so no other test
    is handed it, while the server, which binds with address reuse too, can listen on it. A port
    found free and let go, then bound again by the server, can be taken in between."""
    held: list[socket.socket] = []

    def reserve() -> int:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        held.append(s)
        return int(s.getsockname()[1])

    yield reserve
    for s in held:
        s.close()


class LiveServer:
    """uvicorn serving ``app`` in a thread on a loopback port of its own.

    The listening socket is bound (port 0) here and handed to uvicorn as it is: a port found free
    and bound again later can be taken in between by a test running beside this one."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.sock.close()


@pytest.fixture(scope="session")
def trained_server(trained_ckpt: Path) -> Iterator[LiveServer]:
    from dsv.serve import load_native_app

    app = load_native_app(str(trained_ckpt), model_name="dsv-tiny", max_model_len=1024, api_key="sk-test",
                          num_blocks=256, block_size=16)  # fmt: skip
    with LiveServer(app) as server:
        yield server
