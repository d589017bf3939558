"""Pilot tests of dsv chat against the scripted OpenAI-compatible server on 127.0.0.1.

The server streams reasoning, tool calls and answers like DeepSeek's API; the app runs the real
agent core, so these tests see what a user sees (widgets, header, context panel) and what the
server received (the exact messages of every request: reasoning kept within a turn, dropped after a
new user message, tool results kept).

Run: ``pytest apps/tui/tests/test_tui_app.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import tui_pilot

from dsv.tui.widgets import AnswerBlock, ContextRowView, DroppedView, ReasoningBlock, ToolCard, UserMessage

H = tui_pilot  # shared app-test helpers beside this file (on sys.path in prepend mode)
SE = H.load_scripted_endpoint()
Reply = SE.Reply

Q1 = "What does notes.txt say?"
R1 = "The user asks about notes.txt; read it first."
R2 = "The file says the launch is on Friday."
A1 = "The notes say: **launch on Friday**."
Q2 = "Thanks. And in one word?"
R3 = "One word: Friday."
A2 = "Friday."


def weather_script(body: dict[str, Any]) -> Any:
    """Q1 -> read_file call -> answer; Q2 -> answer. Chosen by the last message, so retries replay."""
    last = body["messages"][-1]
    if last["role"] == "tool":
        return Reply(content=A1, reasoning_content=R2, reasoning_tokens=8)
    if last.get("content") == Q2:
        return Reply(content=A2, reasoning_content=R3, reasoning_tokens=3)
    return Reply(content="", reasoning_content=R1, tool_calls=[{"name": "read_file", "arguments": {"path": "notes.txt"}}])


@pytest.fixture
def endpoint():
    with SE.ScriptedEndpoint(weather_script) as ep:
        yield ep


def _workspace(tmp_path: Path) -> None:
    (tmp_path / "workspace").mkdir(parents=True, exist_ok=True)
    (tmp_path / "workspace" / "notes.txt").write_text("launch on Friday\n")


def _roles(messages: list[dict[str, Any]]) -> list[str]:
    return [m["role"] for m in messages]


@pytest.mark.asyncio
async def test_thinking_with_tools_turn_renders_and_sends_the_rule(endpoint, tmp_path: Path) -> None:
    _workspace(tmp_path)
    app = H.build_app(endpoint.base_url, tmp_path)
    async with app.run_test(size=(140, 50)) as pilot:
        await H.probed(pilot)
        assert app.chat.header.state == "idle" and "ready" in H.screen_text(app).splitlines()[1]
        states: list[str] = []
        app.chat.watch(app.chat.header, "state", lambda state: states.append(state), init=False)
        await H.send(pilot, Q1, type_it=True)
        await H.turn_done(pilot)
        chat = app.chat
        # the header went through every state of a thinking-with-tools turn, in order
        assert [s for s in dict.fromkeys(states)] == ["connecting", "waiting", "streaming", "tool", "idle"]
        # widgets: the question, a reasoning block per step (kept), the tool card, the Markdown answer
        assert [w.text for w in chat.query(UserMessage)] == [Q1]
        blocks = list(chat.query(ReasoningBlock))
        assert [(b.step, b.text, b.kept) for b in blocks] == [(1, R1, True), (2, R2, True)]
        assert "kept this turn" in str(blocks[0].title)
        (card,) = chat.query(ToolCard)
        assert (card.tool_name, card.status) == ("read_file", "ok")
        assert card.result is not None and "launch on Friday" in card.result
        assert json.loads(card.arguments) == {"path": "notes.txt"}
        assert card.duration_s is not None and "✓" in str(card.title)
        assert card.collapsed
        card.collapsed = False  # expands to the arguments and result
        await pilot.pause()
        assert "launch on Friday" in H.screen_text(app)
        (answer,) = chat.query(AnswerBlock)
        assert answer.text == A1
        # Markdown rendered: the bold text shows without its asterisks
        assert "The notes say: launch on Friday." in H.screen_text(app)
        # the header: idle again, the turn's usage and latency
        assert chat.header.state == "idle"
        assert " in · " in chat.header.last_turn and "out" in chat.header.last_turn

        # what the server received: step 2 carries step 1's reasoning (same user turn)
        first, second = endpoint.requests
        assert _roles(first["messages"]) == ["user"]
        assert _roles(second["messages"]) == ["user", "assistant", "tool"]
        assert second["messages"][1]["reasoning_content"] == R1
        assert second["messages"][2]["content"] == card.result  # the result as the card shows it
        assert first["thinking"] == {"type": "enabled"} and first["chat_template_kwargs"] == {"thinking": True}

        # the context panel: the next request is the whole history with this turn's reasoning kept
        panel = chat.context_panel
        rows = [r.row for r in panel.query(ContextRowView)]
        assert [r.role for r in rows] == ["user", "assistant", "tool", "assistant"]
        assert [r.reasoning for r in rows] == [None, "kept", None, "kept"]
        assert all(r.tokens and r.tokens > 0 for r in rows)
        assert not list(panel.query(DroppedView))

        # a new user message: the earlier reasoning moves to "dropped", in the UI and on the wire
        await H.send(pilot, Q2)
        await H.turn_done(pilot)
        third = endpoint.requests[2]
        assert _roles(third["messages"]) == ["user", "assistant", "tool", "assistant", "user"]
        assert not any("reasoning_content" in m for m in third["messages"])
        assert third["messages"][1]["tool_calls"][0]["function"]["name"] == "read_file"
        assert third["messages"][2]["content"] == card.result
        blocks = list(chat.query(ReasoningBlock))
        assert [(b.text, b.kept) for b in blocks] == [(R1, False), (R2, False), (R3, True)]
        assert blocks[0].collapsed and "dropped" in str(blocks[0].title)
        dropped = [d.dropped.message_index for d in panel.query(DroppedView)]
        assert dropped == [1, 3]
        rows = [r.row for r in panel.query(ContextRowView)]
        assert [r.reasoning for r in rows] == [None, None, None, None, None, "kept"]
        assert panel.view is not None and panel.view.total_tokens == sum(r.tokens for r in rows)
        assert f"{panel.view.total_tokens:,} tok" in str(chat.header.render())
        await H.close(app)


@pytest.mark.asyncio
async def test_context_panel_shows_exactly_what_each_request_sent(endpoint, tmp_path: Path) -> None:
    """While a turn runs, the panel shows TurnStarted.request_messages: the body the server got."""
    _workspace(tmp_path)
    app = H.build_app(endpoint.base_url, tmp_path)
    seen: list[list[dict[str, Any]]] = []
    async with app.run_test(size=(140, 50)) as pilot:
        chat = app.chat
        original = chat.refresh_context

        def spy(request: list[dict[str, Any]] | None = None) -> Any:
            if request is not None:
                seen.append(request)
            return original(request)

        chat.refresh_context = spy  # type: ignore[method-assign]
        await H.send(pilot, Q1)
        await H.turn_done(pilot)
        await H.send(pilot, Q2)
        await H.turn_done(pilot)
        assert seen == [r["messages"] for r in endpoint.requests]
        await H.close(app)


@pytest.mark.asyncio
async def test_context_panel_toggles_and_thinking_switch_goes_out(endpoint, tmp_path: Path) -> None:
    _workspace(tmp_path)
    app = H.build_app(endpoint.base_url, tmp_path, show_context=False)
    async with app.run_test(size=(140, 50)) as pilot:
        chat = app.chat
        assert not chat.context_panel.display
        await pilot.press("ctrl+k")
        assert chat.context_panel.display
        await pilot.press("ctrl+k")
        assert not chat.context_panel.display
        await pilot.press("ctrl+t")  # thinking off
        assert chat.header.thinking is False and app.agent.session.thinking is False
        assert "thinking OFF" in H.screen_text(app)
        await H.send(pilot, Q2)
        await H.turn_done(pilot)
        assert endpoint.requests[-1]["thinking"] == {"type": "disabled"}
        assert endpoint.requests[-1]["chat_template_kwargs"] == {"thinking": False}
        await H.close(app)
