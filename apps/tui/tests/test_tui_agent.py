"""The agent loop against a real OpenAI-compatible server on 127.0.0.1 (the scripted endpoint of
packages/synth/tests), through the official openai client.

What the wire carries on each request of a thinking-with-tools turn and of the next user turn
(the V3.2 rule: reasoning kept inside the turn, dropped after a new user message, tool calls and
results kept), usage and latency per step and turn, approvals, cancel, and every endpoint fault
as an `AgentError` event with the session file still valid.

Run: pytest apps/tui/tests/test_tui_agent.py
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from dsv.tui.agent import Agent
from dsv.tui.client import ChatClient
from dsv.tui.events import (
    AgentError,
    ApprovalNeeded,
    ContentDelta,
    ReasoningDelta,
    Status,
    StepFinished,
    ToolCallFinished,
    ToolCallStarted,
    TurnFinished,
    TurnStarted,
)
from dsv.tui.session import SessionStore
from dsv.tui.tools import ApprovalPolicy, EditedArguments, ToolRegistry

REPO = Path(__file__).resolve().parents[3]


def _scripted() -> ModuleType:
    name = "dsv_synth_tests_scripted_endpoint"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, REPO / "packages/synth/tests/scripted_endpoint.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


SE = _scripted()
Reply = SE.Reply


def make_agent(
    base_url: str, tmp: Path, *, mode: str = "auto-read-only", read_timeout_s: float = 30.0, **tool_kw: Any
) -> Agent:
    ws = tmp / "ws"
    ws.mkdir(exist_ok=True)
    store = SessionStore(tmp / "sessions")
    client = ChatClient(base_url, "sk-test", "scripted", read_timeout_s=read_timeout_s, connect_timeout_s=2.0)
    return Agent(
        client, ToolRegistry(ws, **tool_kw), ApprovalPolicy(mode=mode), store.new(system="Be brief.")
    )


async def _never_asked(event: ApprovalNeeded) -> Any:
    raise AssertionError(f"no approval expected, got {event}")


def run(agent: Agent, text: str | None, approve: Callable[..., Any] = _never_asked) -> list[Any]:
    async def go() -> list[Any]:
        events = agent.run_turn(text, approve) if text is not None else agent.retry_turn(approve)
        return [e async for e in events]

    return asyncio.run(go())


def of(events: list[Any], kind: type) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


def script_by_step(replies: list[Any]) -> Callable[[dict[str, Any]], Any]:
    """Answers the n-th request with replies[n]."""
    count = iter(range(10_000))
    return lambda body: replies[next(count)]


def test_thinking_with_tools_turn_and_next_turn_on_the_wire(tmp_path: Path) -> None:
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "notes.txt").write_text("hello world\n")
    replies = [
        Reply(content="", reasoning_content="I should read the file.",
              tool_calls=[{"name": "read_file", "arguments": {"path": "notes.txt"}}], reasoning_tokens=5),
        Reply(content="It says hello world.", reasoning_content="The file greets the world.", reasoning_tokens=4),
        Reply(content="You are welcome.", reasoning_content="A polite reply."),
    ]  # fmt: skip
    with SE.ScriptedEndpoint(script_by_step(replies)) as ep:
        agent = make_agent(ep.base_url, tmp_path)
        first = run(agent, "What is in notes.txt?")
        second = run(agent, "Thanks")
        bodies = ep.requests

    assert len(bodies) == 3
    system = {"role": "system", "content": "Be brief."}
    user1 = {"role": "user", "content": "What is in notes.txt?"}
    call_id = bodies[1]["messages"][2]["tool_calls"][0]["id"]
    call = {
        "id": call_id,
        "type": "function",
        "function": {"name": "read_file", "arguments": '{"path": "notes.txt"}'},
    }
    step1 = {
        "role": "assistant",
        "content": "",
        "reasoning_content": "I should read the file.",
        "tool_calls": [call],
    }
    result = {"role": "tool", "tool_call_id": call_id, "content": "     1\thello world"}
    answer1 = {"role": "assistant", "content": "It says hello world.",
               "reasoning_content": "The file greets the world."}  # fmt: skip
    # Inside the turn: the step's reasoning goes back with its tool call and the result.
    assert bodies[0]["messages"] == [system, user1]
    assert bodies[1]["messages"] == [system, user1, step1, result]
    # The next user turn: the earlier turn's reasoning is dropped, its tool call and result stay.
    no_reasoning = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in (step1, answer1)]
    assert bodies[2]["messages"] == [system, user1, no_reasoning[0], result, no_reasoning[1],
                                     {"role": "user", "content": "Thanks"}]  # fmt: skip
    for body in bodies:
        assert set(body) == {"model", "messages", "stream", "stream_options", "tools", "thinking",
                             "chat_template_kwargs"}  # fmt: skip
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert body["thinking"] == {"type": "enabled"} and body["chat_template_kwargs"] == {"thinking": True}
        assert body["model"] == "scripted"
        assert {t["function"]["name"] for t in body["tools"]} >= {
            "read_file",
            "write_file",
            "shell",
            "python",
        }
    # What TurnStarted said would be sent is what was sent, request by request.
    started = of(first, TurnStarted) + of(second, TurnStarted)
    assert [e.request_messages for e in started] == [b["messages"] for b in bodies]
    assert [e.step for e in started] == [1, 2, 1]

    # The events of the first turn, in order.
    assert (
        "".join(e.text for e in of(first, ReasoningDelta))
        == "I should read the file.The file greets the world."
    )
    assert "".join(e.text for e in of(first, ContentDelta)) == "It says hello world."
    (tc,) = of(first, ToolCallStarted)
    assert (tc.name, json.loads(tc.arguments), tc.step) == ("read_file", {"path": "notes.txt"}, 1)
    (done,) = of(first, ToolCallFinished)
    assert done.ok and done.result == "     1\thello world" and not done.truncated and done.duration_s >= 0
    states = [e.state for e in of(first, Status)]
    assert states[:4] == ["connecting", "waiting", "streaming", "tool"] and states[-1] == "idle"
    # Usage per step (the server's counts) and per turn (their sum); latency and time to first token.
    steps = of(first, StepFinished)
    assert [s.finish_reason for s in steps] == ["tool_calls", "stop"]
    assert [s.usage.reasoning_tokens for s in steps] == [5, 4]
    assert steps[0].usage.prompt_tokens == 6  # words of "Be brief." + "What is in notes.txt?"
    assert all(s.latency_s > 0 and s.ttft_s is not None and 0 < s.ttft_s <= s.latency_s for s in steps)
    (fin,) = of(first, TurnFinished)
    assert fin.answer == "It says hello world."
    assert fin.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in steps)
    assert fin.usage.completion_tokens == sum(s.usage.completion_tokens for s in steps)
    assert fin.latency_s >= sum(s.latency_s for s in steps)

    # The session file holds everything, reasoning included, and the per-turn stats.
    saved = SessionStore(tmp_path / "sessions").load(agent.session.id)
    assert saved.messages == [user1, step1, result, answer1, {"role": "user", "content": "Thanks"},
                              {"role": "assistant", "content": "You are welcome.", "reasoning_content": "A polite reply."}]  # fmt: skip
    assert [len(t["steps"]) for t in saved.turn_stats] == [2, 1]
    assert saved.turn_stats[0]["usage"]["reasoning_tokens"] == 9
    assert saved.title == "What is in notes.txt?"
    # The context panel's view of the next request is the rule applied to the saved history.
    nxt = agent.next_request_messages("And now?")
    assert nxt[-1] == {"role": "user", "content": "And now?"}
    assert not any("reasoning_content" in m for m in nxt)
    counts = agent.count_tokens(nxt)
    assert len(counts) == len(nxt) and not counts.exact and not agent.token_counts_exact  # no /tokenize here
    assert all(c > 0 for c in counts)


def test_thinking_off_is_sent_both_ways(tmp_path: Path) -> None:
    with SE.ScriptedEndpoint(lambda body: Reply(content="ok")) as ep:
        agent = make_agent(ep.base_url, tmp_path)
        agent.thinking = False
        events = run(agent, "hi")
        body = ep.requests[0]
    assert of(events, TurnFinished)[0].answer == "ok"
    assert body["thinking"] == {"type": "disabled"} and body["chat_template_kwargs"] == {"thinking": False}
    assert agent.session.thinking is False


def test_approval_deny_always_and_edited_arguments(tmp_path: Path) -> None:
    replies = [
        Reply(tool_calls=[{"name": "write_file", "arguments": {"path": "a.txt", "content": "one\n"}}]),
        Reply(content="denied, ok"),
        Reply(tool_calls=[{"name": "write_file", "arguments": {"path": "a.txt", "content": "two\n"}}]),
        Reply(tool_calls=[{"name": "write_file", "arguments": {"path": "a.txt", "content": "three\n"}}]),
        Reply(content="written"),
        Reply(tool_calls=[{"name": "shell", "arguments": {"command": "echo hi"}}]),
        Reply(content="ran"),
    ]
    asked: list[ApprovalNeeded] = []
    answers = iter(["deny", "always", EditedArguments({"command": "echo edited"})])

    async def approve(event: ApprovalNeeded) -> Any:
        asked.append(event)
        return next(answers)

    with SE.ScriptedEndpoint(script_by_step(replies)) as ep:
        agent = make_agent(ep.base_url, tmp_path, mode="ask")
        denied = run(agent, "write one", approve)
        allowed = run(agent, "write two then three", approve)
        edited = run(agent, "run a command", approve)
        bodies = ep.requests

    ws = tmp_path / "ws"
    # Denied: nothing written, the model is told, and the turn goes on to an answer.
    assert asked[0].name == "write_file" and asked[0].arguments == {"path": "a.txt", "content": "one\n"}
    assert asked[0].preview == "--- /dev/null\n+++ b/a.txt\n@@ -0,0 +1 @@\n+one\n"
    (d,) = of(denied, ToolCallFinished)
    assert not d.ok and "denied" in d.result
    assert bodies[1]["messages"][-1]["content"] == d.result
    assert of(denied, TurnFinished)[0].answer == "denied, ok"
    # "always": the second write_file of the session is not asked about.
    assert [e.name for e in of(allowed, ApprovalNeeded)] == ["write_file"]
    assert "write_file" in agent.policy.always_allowed
    assert (ws / "a.txt").read_text() == "three\n"
    assert [e.ok for e in of(allowed, ToolCallFinished)] == [True, True]
    assert "-two\n+three" in of(allowed, ToolCallFinished)[1].result
    # Edited arguments run instead of the model's, and the session records what ran.
    assert asked[2].preview.startswith("$ echo hi")
    (e,) = of(edited, ToolCallFinished)
    assert e.ok and e.result == "edited\n[exit code 0]"
    call = agent.session.messages[-3]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"command": "echo edited"}


def test_user_tools_that_hang_crash_or_flood_do_not_stop_the_turn(tmp_path: Path) -> None:
    tools_file = tmp_path / "my_tools.py"
    tools_file.write_text(
        "import time\n\n"
        "def hang(seconds: int) -> str:\n    '''Sleep.'''\n    time.sleep(seconds)\n    return 'woke'\n\n"
        "def crash() -> str:\n    '''Fail.'''\n    raise RuntimeError('tool broke')\n\n"
        "def flood() -> str:\n    '''Print a lot.'''\n    return 'x' * 100_000\n\n"
        "READ_ONLY = {'hang', 'crash', 'flood'}\n"
    )
    replies = [
        Reply(tool_calls=[{"name": "hang", "arguments": {"seconds": 30}}, {"name": "crash", "arguments": {}},
                          {"name": "flood", "arguments": {}}, {"name": "nope", "arguments": {}},
                          {"name": "read_file", "arguments": "{not json"}]),
        Reply(content="survived"),
    ]  # fmt: skip
    with SE.ScriptedEndpoint(script_by_step(replies)) as ep:
        agent = make_agent(ep.base_url, tmp_path, timeout_s=0.5, max_result_chars=2000)
        agent.tools.load_user_file(tools_file)
        t0 = time.monotonic()
        events = run(agent, "try the tools")
        elapsed = time.monotonic() - t0
        sent_back = ep.requests[1]["messages"][-5:]
    results = {e.name: e for e in of(events, ToolCallFinished)}
    assert not results["hang"].ok and "ran longer than 0.5 s" in results["hang"].result
    assert not results["crash"].ok and "RuntimeError: tool broke" in results["crash"].result
    assert results["flood"].ok and results["flood"].truncated
    assert len(results["flood"].result) < 2500 and "characters cut" in results["flood"].result
    assert not results["nope"].ok and "no tool named `nope`" in results["nope"].result
    assert not results["read_file"].ok and "not valid JSON" in results["read_file"].result
    assert [m["content"] for m in sent_back] == [
        results[n].result for n in ("hang", "crash", "flood", "nope", "read_file")
    ]
    assert of(events, TurnFinished)[0].answer == "survived"
    assert elapsed < 10


def _assert_session_intact(agent: Agent, tmp_path: Path, n_messages: int) -> None:
    saved = SessionStore(tmp_path / "sessions").load(agent.session.id)
    assert saved.messages == agent.session.messages
    assert len(saved.messages) == n_messages
    assert saved.messages[-1]["role"] in ("user", "tool")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_endpoint_down_is_a_connect_error(tmp_path: Path) -> None:
    agent = make_agent(f"http://127.0.0.1:{_closed_port()}/v1", tmp_path)
    events = run(agent, "hello?")
    (err,) = of(events, AgentError)
    assert err.kind == "connect" and err.retryable and "cannot reach http://127.0.0.1" in err.message
    assert of(events, Status)[-1].state == "error"
    _assert_session_intact(agent, tmp_path, 1)


@pytest.mark.parametrize(
    ("reply", "kind", "retry_after", "retryable", "words"),
    [
        (Reply(status=401, content="bad key"), "auth", None, False, "refused the API key (401: bad key)"),
        (Reply(status=429, content="slow down", headers={"Retry-After": "7"}), "rate_limit", 7.0, True,
         "retry in 7 s"),
        (Reply(status=500, content="engine died"), "server", None, True, "answered 500: engine died"),
        (Reply(status=400, content="max_tokens too big"), "server", None, False, "answered 400"),
        (Reply(content="some answer text here", reasoning_content="thinking hard", malformed=True), "stream", None,
         True, "malformed stream"),
        (Reply(content="some answer text here", reasoning_content="thinking hard", stall_s=3.0), "stream", None,
         True, "stopped sending for 0.5 s"),
        (Reply(content="some answer text here", reasoning_content="thinking hard", cut=True), "stream", None,
         True, "broke off"),
    ],
    ids=["401", "429-retry-after", "500", "400", "malformed-sse", "stalled", "cut"],
)  # fmt: skip
def test_endpoint_faults_are_events_and_the_turn_can_be_retried(
    tmp_path: Path, reply: Any, kind: str, retry_after: float | None, retryable: bool, words: str
) -> None:
    replies = [reply, Reply(content="fine now", reasoning_content="ok")]
    with SE.ScriptedEndpoint(script_by_step(replies)) as ep:
        agent = make_agent(ep.base_url, tmp_path, read_timeout_s=0.5)
        events = run(agent, "hello")
        (err,) = of(events, AgentError)
        assert (err.kind, err.retry_after_s, err.retryable) == (kind, retry_after, retryable), err
        assert words in err.message
        assert of(events, Status)[-1].state == "error"
        assert not of(events, TurnFinished)
        _assert_session_intact(agent, tmp_path, 1)
        assert agent.session.turn_stats[-1]["error"]["kind"] == kind
        # The same turn again, without a second user message.
        again = run(agent, None)
        assert of(again, TurnFinished)[0].answer == "fine now"
        assert ep.requests[1]["messages"] == ep.requests[0]["messages"]
    assert [m["role"] for m in agent.session.messages] == ["user", "assistant"]


def test_cancel_mid_stream_keeps_what_was_shown(tmp_path: Path) -> None:
    slow = Reply(content="a long answer " * 20, reasoning_content="think", chunk_delay_s=0.05)
    replies = [slow, Reply(content="resumed")]

    async def go(agent: Agent) -> list[Any]:
        out = []
        async for e in agent.run_turn("talk", _never_asked):
            out.append(e)
            if isinstance(e, ContentDelta) and len(of(out, ContentDelta)) == 2:
                agent.cancel()
        return out

    with SE.ScriptedEndpoint(script_by_step(replies)) as ep:
        agent = make_agent(ep.base_url, tmp_path)
        t0 = time.monotonic()
        events = asyncio.run(go(agent))
        assert time.monotonic() - t0 < 3  # the rest of the slow stream (~2 s) was not waited for
        (err,) = of(events, AgentError)
        assert err.kind == "cancelled" and err.retryable
        assert of(events, Status)[-1].state == "idle"
        shown = "".join(e.text for e in of(events, ContentDelta))
        last = agent.session.messages[-1]
        assert last == {"role": "assistant", "content": shown, "reasoning_content": "think"}
        assert SessionStore(tmp_path / "sessions").load(agent.session.id).messages == agent.session.messages
        # Retry regenerates: the partial answer is replaced, not followed by a second one.
        assert of(run(agent, None), TurnFinished)[0].answer == "resumed"
        assert ep.requests[1]["messages"] == ep.requests[0]["messages"]
    assert [m["role"] for m in agent.session.messages] == ["user", "assistant"]
    assert agent.session.messages[-1]["content"] == "resumed"


def test_cancel_a_running_tool_kills_it_and_answers_every_call(tmp_path: Path) -> None:
    marker = tmp_path / "ws" / "late.txt"
    replies = [
        Reply(tool_calls=[{"name": "shell", "arguments": {"command": "sleep 2; touch late.txt"}},
                          {"name": "list_files", "arguments": {}}]),
        Reply(content="after"),
    ]  # fmt: skip

    async def go(agent: Agent) -> list[Any]:
        out = []
        async for e in agent.run_turn("run it", _never_asked):
            out.append(e)
            if isinstance(e, Status) and e.state == "tool":
                asyncio.get_running_loop().call_later(0.3, agent.cancel)
        return out

    with SE.ScriptedEndpoint(script_by_step(replies)) as ep:
        agent = make_agent(ep.base_url, tmp_path, mode="auto-all")
        t0 = time.monotonic()
        events = asyncio.run(go(agent))
        assert time.monotonic() - t0 < 3
        assert of(events, AgentError)[0].kind == "cancelled"
        finished = of(events, ToolCallFinished)
        assert [(f.name, f.ok) for f in finished] == [("shell", False), ("list_files", False)]
        assert all("cancelled" in f.result for f in finished)
        # Every tool call has its result, so the next request is valid; the killed command never finished.
        roles = [m["role"] for m in agent.session.messages]
        assert roles == ["user", "assistant", "tool", "tool"]
        time.sleep(2.5)
        assert not marker.exists()
        assert of(run(agent, None), TurnFinished)[0].answer == "after"


def test_a_failing_save_or_approval_dialog_is_an_event(tmp_path: Path) -> None:
    replies = [
        Reply(content="first"),
        Reply(tool_calls=[{"name": "shell", "arguments": {"command": "touch ran.txt"}}]),
        Reply(content="went on"),
    ]
    with SE.ScriptedEndpoint(script_by_step(replies)) as ep:
        agent = make_agent(ep.base_url, tmp_path)
        real_save = agent.session.save
        calls = iter(range(100))

        def full_disk(**kw: Any) -> Path:
            if next(calls) >= 1:  # the user message is saved, the answer is not
                raise OSError(28, "No space left on device")
            return real_save(**kw)

        agent.session.save = full_disk  # type: ignore[method-assign]
        events = run(agent, "hi")
        (err,) = of(events, AgentError)
        assert err.kind == "session" and "No space left on device" in err.message and "/save" in err.message
        assert agent.session.messages[-1]["content"] == "first"  # kept in memory
        agent.session.save = real_save  # type: ignore[method-assign]

        async def broken_dialog(event: ApprovalNeeded) -> Any:
            raise RuntimeError("dialog crashed")

        events = run(agent, "run it", broken_dialog)
    (done,) = of(events, ToolCallFinished)
    assert not done.ok and "approval could not be asked (RuntimeError: dialog crashed)" in done.result
    assert not (tmp_path / "ws" / "ran.txt").exists()
    assert of(events, TurnFinished)[0].answer == "went on"
    assert SessionStore(tmp_path / "sessions").load(agent.session.id).messages == agent.session.messages


def test_a_turn_that_never_answers_stops_after_max_steps(tmp_path: Path) -> None:
    loop = Reply(tool_calls=[{"name": "list_files", "arguments": {}}])
    with SE.ScriptedEndpoint(lambda body: loop) as ep:
        agent = make_agent(ep.base_url, tmp_path)
        agent.max_steps = 2
        events = run(agent, "keep going")
        n_requests = len(ep.requests)
    (err,) = of(events, AgentError)
    assert err.kind == "tool" and err.retryable and "stopped after 2 steps" in err.message
    assert n_requests == 2 and len(of(events, ToolCallFinished)) == 2
    assert [m["role"] for m in agent.session.messages] == ["user", "assistant", "tool", "assistant", "tool"]
