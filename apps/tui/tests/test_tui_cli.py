"""``dsv chat`` from the outside, and the agent against a real ``dsv serve`` on 127.0.0.1.

- ``dsv chat --print`` as a subprocess against the scripted endpoint: the answer on stdout, exit 0;
  each failure (endpoint down, 401, 429, a broken stream, bad flags, a missing session or file)
  one ``error:`` line and its exit code, never a traceback.
- The agent against dsv serve with the serve tests' trained one-layer checkpoint (it answers its
  fixed conversations exactly under greedy decoding): reasoning streamed in thinking mode, a tool
  call, its result and the answer after it, and exact token counts from ``/tokenize`` that add up
  to the server's own ``prompt_tokens``.
- ``dsv chat --print hi --endpoint`` against that server (random-weight answers: protocol, not
  content), and ``--serve PATH`` starting and stopping its own server with no process left over,
  also when ``dsv chat`` itself is killed.

Run: pytest apps/tui/tests/test_tui_cli.py  (the --serve tests are marked slow)
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from dsv.tui.agent import Agent
from dsv.tui.client import ChatClient
from dsv.tui.events import ReasoningDelta, StepFinished, ToolCallFinished, TurnFinished, TurnStarted
from dsv.tui.session import SessionStore
from dsv.tui.tools import ApprovalPolicy, Tool, ToolRegistry

REPO = Path(__file__).resolve().parents[3]


def _load(name: str, path: Path) -> ModuleType:
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


SE = _load("dsv_synth_tests_scripted_endpoint", REPO / "packages/synth/tests/scripted_endpoint.py")
# The serve tests' fixtures (tiny checkpoints, one torch thread, the uvicorn LiveServer), reused here.
_serve = _load("dsv_serve_tests_conftest", REPO / "packages/serve/tests/conftest.py")
trained_ckpt = _serve.trained_ckpt
tiny_ckpt = _serve.tiny_ckpt
_one_torch_thread = _serve._one_torch_thread
Reply = SE.Reply


def dsv_chat(
    *args: str, cwd: Path, timeout: float = 120, stdin: str | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DSV_SESSIONS_DIR": str(cwd / "sessions")}
    env.pop("DSV_API_KEY", None)
    env.pop("OPENAI_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "dsv.cli.main", "chat", *args, "--workspace", str(cwd)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, input=stdin,
    )  # fmt: skip


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def test_print_answers_and_runs_tools(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("the code word is teal\n")
    replies = iter([
        Reply(reasoning_content="read it", tool_calls=[{"name": "read_file", "arguments": {"path": "notes.txt"}}]),
        Reply(reasoning_content="now write", tool_calls=[{"name": "write_file",
                                                          "arguments": {"path": "out.txt", "content": "x"}}]),
        Reply(content="The code word is teal.", reasoning_content="done"),
    ])  # fmt: skip
    with SE.ScriptedEndpoint(lambda body: next(replies)) as ep:
        proc = dsv_chat("--print", "What is the code word?", "--endpoint", ep.base_url, "--api-key", "sk-1",
                        cwd=tmp_path)  # fmt: skip
        bodies = ep.requests
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "The code word is teal.\n"
    assert "dsv chat: tool read_file" in proc.stderr
    assert "denied write_file (no one to approve with --print" in proc.stderr
    assert not (tmp_path / "out.txt").exists()
    assert bodies[0]["model"] == "scripted"  # the endpoint's first model, asked for with /v1/models
    assert bodies[1]["messages"][-1]["content"] == "     1\tthe code word is teal"
    (info,) = SessionStore(tmp_path / "sessions").list()
    assert info.n_messages == 6 and f"session {info.id}" in proc.stderr


MCP_SERVER = '''
try:
    from mcp.server.mcpserver import MCPServer as Server
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP as Server

server = Server("calc")


@server.tool()
def add(a: int, b: int) -> str:
    """Add two numbers."""
    return str(a + b)


server.run()
'''


def test_print_with_user_and_mcp_tools(tmp_path: Path) -> None:
    (tmp_path / "calc_server.py").write_text(MCP_SERVER)
    (tmp_path / "mine.py").write_text(
        'def shout(text: str) -> str:\n    """Upper-case."""\n    return text.upper()\n'
    )
    replies = iter([
        Reply(tool_calls=[{"name": "add", "arguments": {"a": 2, "b": 40}},
                          {"name": "shout", "arguments": {"text": "hey"}}]),
        Reply(content="done"),
    ])  # fmt: skip
    with SE.ScriptedEndpoint(lambda body: next(replies)) as ep:
        proc = dsv_chat("--print", "use the tools", "--endpoint", ep.base_url, "--model", "m", "--approval",
                        "auto-all", "--mcp", f"{sys.executable} {tmp_path / 'calc_server.py'}",
                        "--tools-file", str(tmp_path / "mine.py"), cwd=tmp_path)  # fmt: skip
        bodies = ep.requests
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "done\n"
    assert {"add", "shout", "read_file"} <= {t["function"]["name"] for t in bodies[0]["tools"]}
    assert [m["content"] for m in bodies[1]["messages"][-2:]] == ["42", "HEY"]
    time.sleep(0.5)
    assert _processes_mentioning(str(tmp_path / "calc_server.py")) == []  # the MCP server was stopped


def test_print_reads_stdin_and_resumes_a_session(tmp_path: Path) -> None:
    with SE.ScriptedEndpoint(lambda body: Reply(content=f"n={len(body['messages'])}")) as ep:
        first = dsv_chat("--print", "-", "--endpoint", ep.base_url, "--model", "m", "--no-think",
                         cwd=tmp_path, stdin="from stdin")  # fmt: skip
        again = dsv_chat("--print", "more", "--endpoint", ep.base_url, "--model", "m", "--resume", "last",
                         cwd=tmp_path)  # fmt: skip
        # No --endpoint: a resumed session goes back to the endpoint and model it was on.
        third = dsv_chat("--print", "and more", "--resume", "last", cwd=tmp_path)
        bodies = ep.requests
    assert third.returncode == 0 and third.stdout == "n=5\n" and "resuming on" in third.stderr
    assert bodies[2]["model"] == "m"
    assert (first.returncode, first.stdout, again.returncode, again.stdout) == (0, "n=1\n", 0, "n=3\n")
    assert bodies[0]["messages"] == [{"role": "user", "content": "from stdin"}]
    assert bodies[0]["thinking"] == {"type": "disabled"} and bodies[1]["thinking"] == {"type": "disabled"}
    assert len(SessionStore(tmp_path / "sessions").list()) == 1


def test_a_killed_chat_keeps_the_answer_it_was_showing(tmp_path: Path) -> None:
    answer = "".join(f"word{i} " for i in range(60))
    slow = Reply(content=answer, reasoning_content="thinking it over", chunk_delay_s=0.05)
    sessions = tmp_path / "sessions"
    with SE.ScriptedEndpoint(lambda body: slow) as ep:
        env = {**os.environ, "DSV_SESSIONS_DIR": str(sessions)}
        chat = subprocess.Popen(
            [sys.executable, "-m", "dsv.cli.main", "chat", "--print", "talk", "--endpoint", ep.base_url,
             "--model", "m", "--workspace", str(tmp_path)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        shown = ""
        while time.monotonic() < deadline and not shown:
            time.sleep(0.1)
            for f in sessions.glob("*.json"):
                messages = json.loads(f.read_text())["messages"]
                if messages[-1]["role"] == "assistant" and messages[-1]["content"]:
                    shown = messages[-1]["content"]
        chat.send_signal(signal.SIGKILL)  # mid-stream: the answer takes about 2 s to arrive
        chat.wait(10)
    (info,) = SessionStore(sessions).list()
    saved = SessionStore(sessions).load(info.id).messages
    assert [m["role"] for m in saved] == ["user", "assistant"]
    partial = saved[-1]
    assert partial["reasoning_content"] == "thinking it over"
    assert 0 < len(partial["content"]) < len(answer) and answer.startswith(partial["content"])


@pytest.mark.parametrize(
    ("reply", "words"),
    [
        (Reply(status=401, content="bad key"), "refused the API key (401: bad key)"),
        (Reply(status=429, content="busy", headers={"Retry-After": "3"}), "(retry after 3 s)"),
        (Reply(content="half an answer here", malformed=True), "malformed stream"),
        (Reply(status=503, content="overloaded"), "answered 503: overloaded"),
    ],
    ids=["401", "429", "malformed", "503"],
)
def test_print_endpoint_failures_exit_3_with_one_line(tmp_path: Path, reply: Any, words: str) -> None:
    with SE.ScriptedEndpoint(lambda body: reply) as ep:
        proc = dsv_chat("--print", "hi", "--endpoint", ep.base_url, "--model", "m", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert words in one_error_line(proc)
    assert proc.stdout == ""
    (info,) = SessionStore(tmp_path / "sessions").list()  # the session survived, readable
    assert info.error is None and info.n_messages == 1


def test_print_endpoint_down_exits_3(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = dsv_chat("--print", "hi", "--endpoint", f"http://127.0.0.1:{port}/v1", cwd=tmp_path)
    assert proc.returncode == 3
    assert f"cannot reach http://127.0.0.1:{port}/v1" in one_error_line(proc)


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--approval", "yolo"], 2, "--approval 'yolo' is not a mode"),
        (["--endpoint", "http://x/v1", "--serve", "."], 2, "give --endpoint or --serve, not both"),
        (["--resume", "nope", "--endpoint", "http://127.0.0.1:9/v1"], 1, "no session `nope`"),
        (
            ["--tools-file", "missing.py", "--endpoint", "http://127.0.0.1:9/v1"],
            1,
            "missing.py does not exist",
        ),
        (["--serve", "not-a-checkpoint"], 1, "not a checkpoint folder"),
        (["--print", "  ", "--endpoint", "http://127.0.0.1:9/v1"], 2, "--print needs a prompt"),
    ],
    ids=["approval", "endpoint+serve", "resume", "tools-file", "serve-path", "empty-prompt"],
)
def test_usage_and_input_errors(tmp_path: Path, args: list[str], code: int, words: str) -> None:
    if "--print" not in args:
        args = [*args, "--print", "hi"]
    proc = dsv_chat(*args, cwd=tmp_path)
    assert proc.returncode == code, proc.stderr
    assert words in one_error_line(proc)


# ----------------------------------------------------------------------------- real dsv serve


@pytest.fixture(scope="module")
def trained_server(trained_ckpt: Path) -> Iterator[Any]:
    from dsv.serve import load_native_app

    app = load_native_app(str(trained_ckpt), model_name="dsv-tiny", max_model_len=1024, api_key="sk-test",
                          num_blocks=256, block_size=16, engine_process=False)  # fmt: skip
    with _serve.LiveServer(app) as server:
        yield server


@pytest.fixture(scope="module")
def tiny_server(tiny_ckpt: Path) -> Iterator[Any]:
    """Random weights, the preset's 4096-token context: room for the built-in tools' schemas."""
    from dsv.serve import load_native_app

    app = load_native_app(str(tiny_ckpt), model_name="tiny", api_key="sk-test", num_blocks=512, block_size=16,
                          engine_process=False)  # fmt: skip
    with _serve.LiveServer(app) as server:
        yield server


WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}}


def test_agent_against_dsv_serve_thinks_calls_a_tool_and_counts_tokens_exactly(
    trained_server: Any, tmp_path: Path
) -> None:
    store = SessionStore(tmp_path / "sessions")
    client = ChatClient(f"{trained_server.url}/v1", "sk-test", "dsv-tiny", max_tokens=200, temperature=0.0)

    async def weather(args: dict[str, Any]) -> str:
        return "sunny, 21 C" if args == {"city": "Paris"} else "unknown city"

    # Thinking mode, no tools: the model's reasoning arrives as reasoning_content, then the answer.
    greet = Agent(client, ToolRegistry(tmp_path, builtins=False), ApprovalPolicy(), store.new())
    events = asyncio.run(_collect(greet, "hi"))
    assert "".join(e.text for e in events if isinstance(e, ReasoningDelta)) == "say hello"
    (fin,) = [e for e in events if isinstance(e, TurnFinished)]
    assert fin.answer == "Hello there!"
    assert greet.session.messages[-1] == {"role": "assistant", "content": "Hello there!",
                                          "reasoning_content": "say hello"}  # fmt: skip
    # Exact counts from /tokenize: per message, adding up to the prompt_tokens the server reported.
    (sent,) = [e.request_messages for e in events if isinstance(e, TurnStarted)]
    (step,) = [e for e in events if isinstance(e, StepFinished)]
    counts = greet.count_tokens(sent)
    assert counts.exact and greet.token_counts_exact
    assert sum(counts) == step.usage.prompt_tokens > 0

    # Thinking off, one tool: the call, its result, the answer that uses it.
    tools = ToolRegistry(tmp_path, builtins=False)
    tools.register(Tool("get_weather", "", WEATHER, True, "user", weather))
    session = store.new(thinking=False)
    agent = Agent(client, tools, ApprovalPolicy(), session)
    events = asyncio.run(_collect(agent, "Weather in Paris?"))
    (call,) = [e for e in events if isinstance(e, ToolCallFinished)]
    assert (call.name, call.ok, call.result) == ("get_weather", True, "sunny, 21 C")
    assert next(e for e in events if isinstance(e, TurnFinished)).answer == "It is sunny in Paris."
    assert [m["role"] for m in store.load(session.id).messages] == ["user", "assistant", "tool", "assistant"]
    assert json.loads(session.messages[1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}


async def _collect(agent: Agent, text: str) -> list[Any]:
    async def never(event: Any) -> Any:
        raise AssertionError(event)

    try:
        return [e async for e in agent.run_turn(text, never)]
    finally:
        await agent.client.aclose()


def test_print_against_dsv_serve(tiny_server: Any, tmp_path: Path) -> None:
    proc = dsv_chat("--print", "hi", "--endpoint", f"{tiny_server.url}/v1", "--api-key", "sk-test",
                    "--max-tokens", "8", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n") and "completion tokens" in proc.stderr
    (info,) = SessionStore(tmp_path / "sessions").list()
    assert info.model == "tiny" and info.n_messages == 2
    wrong_key = dsv_chat("--print", "hi", "--endpoint", f"{tiny_server.url}/v1", "--api-key", "nope",
                         "--model", "tiny", cwd=tmp_path)  # fmt: skip
    assert wrong_key.returncode == 3 and "refused the API key (401" in one_error_line(wrong_key)


def test_embedded_model_is_made_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dsv.tui.local_serve import ensure_default_model

    folder = ensure_default_model(tmp_path / "chat-tiny")
    assert capsys.readouterr().out == ""  # stdout is for --print's answer only
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "deepseek_v32" and (folder / "tokenizer.json").is_file()
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert ensure_default_model(folder) == folder  # the second chat reuses it
    assert (folder / "config.json").stat().st_mtime_ns == stamp


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and int(entry.name) != os.getpid():
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_serve_starts_and_stops_its_own_server(tiny_ckpt: Path, tmp_path: Path) -> None:
    proc = dsv_chat(
        "--print", "hi", "--serve", str(tiny_ckpt), "--max-tokens", "4", cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "dsv chat: dsv serve on http://127.0.0.1:" in proc.stderr
    assert f"(model {tiny_ckpt.name})" in proc.stderr
    time.sleep(0.5)
    assert _processes_mentioning(str(tiny_ckpt)) == []


@pytest.mark.slow
def test_a_killed_chat_takes_its_server_down(tiny_ckpt: Path, tmp_path: Path) -> None:
    # A prompt the tiny server holds on to (a slow stream is not needed: the kill comes right after start).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DSV_SESSIONS_DIR": str(tmp_path / "sessions")}
    chat = subprocess.Popen(
        [sys.executable, "-m", "dsv.cli.main", "chat", "--print", "hi", "--serve", str(tiny_ckpt),
         "--max-tokens", "2000", "--workspace", str(tmp_path)],
        env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    assert chat.stderr is not None
    deadline = time.monotonic() + 300
    for line in chat.stderr:
        if "dsv serve on" in line or time.monotonic() > deadline:
            break
    assert _processes_mentioning(str(tiny_ckpt)) != []
    chat.send_signal(signal.SIGKILL)
    chat.wait(10)
    deadline = time.monotonic() + 30
    while _processes_mentioning(str(tiny_ckpt)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(str(tiny_ckpt)) == []
