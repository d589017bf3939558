"""Pilot tests of dsv chat: the approval dialog, slash commands, the command palette, sessions
(save, restart the app, resume, fork, export), against the scripted server on 127.0.0.1.

Run: ``pytest apps/tui/tests/test_tui_app_commands.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import tui_pilot
from textual import events

from dsv.tui.screens import ApprovalScreen, ForkPickerScreen, HelpScreen, SessionPickerScreen, ToolsScreen
from dsv.tui.widgets import AnswerBlock, ReasoningBlock, ToolCard, UserMessage

H = tui_pilot  # shared app-test helpers beside this file (on sys.path in prepend mode)
SE = H.load_scripted_endpoint()
Reply = SE.Reply


def writer_script(body: dict[str, Any]) -> Any:
    """Asks to write hello.txt; after the result, answers with what the tool said."""
    last = body["messages"][-1]
    if last["role"] == "tool":
        return Reply(content=f"Tool said: {last['content']}", reasoning_content="Report the result.")
    text = last.get("content") or ""
    if text.startswith("run"):
        return Reply(content="", reasoning_content="Use the shell.",
                     tool_calls=[{"name": "shell", "arguments": {"command": "echo hi from the shell"}}])  # fmt: skip
    if text.startswith("write"):
        args = {"path": "hello.txt", "content": "hello\n"}
        return Reply(content="", reasoning_content="Write the file.", tool_calls=[{"name": "write_file", "arguments": args}])
    return Reply(content=f"echo: {text}", reasoning_content=f"Echo {text}.")


@pytest.fixture
def endpoint():
    with SE.ScriptedEndpoint(writer_script) as ep:
        yield ep


async def _approval(pilot: Any) -> ApprovalScreen:
    await H.until(pilot, lambda: isinstance(pilot.app.screen, ApprovalScreen), what="the approval dialog")
    await pilot.pause()
    return pilot.app.screen


@pytest.mark.asyncio
async def test_approval_once_always_deny_and_edit(endpoint, tmp_path: Path) -> None:
    app = H.build_app(endpoint.base_url, tmp_path)
    target = tmp_path / "workspace" / "hello.txt"
    async with app.run_test(size=(140, 50)) as pilot:
        chat = app.chat
        # deny: nothing is written, the card says so, the model is told
        await H.send(pilot, "write 1")
        dialog = await _approval(pilot)
        assert dialog.tool_name == "write_file" and "+hello" in dialog.preview  # the diff
        assert chat.header.state == "approval"
        await pilot.press("n")
        await H.turn_done(pilot)
        assert not target.exists()
        card = list(chat.query(ToolCard))[-1]
        assert card.status == "denied" and "denied" in str(card.title)
        assert "denied" in endpoint.requests[-1]["messages"][-1]["content"]

        # allow once: written; the next call asks again
        await H.send(pilot, "write 2")
        await _approval(pilot)
        await pilot.click("#once")
        await H.turn_done(pilot)
        assert target.read_text() == "hello\n"
        assert list(chat.query(ToolCard))[-1].status == "ok"
        target.unlink()

        # edit the arguments: the call runs with the edited ones, the session records them
        await H.send(pilot, "write 3")
        dialog = await _approval(pilot)
        await pilot.press("e")
        area = dialog.query_one("#approval-arguments")
        area.text = "{not json"
        await pilot.press("ctrl+s")
        assert "not JSON" in str(dialog.query_one("#approval-error").render())
        area.text = json.dumps({"path": "edited.txt", "content": "edited\n"})
        await pilot.press("ctrl+s")
        await H.turn_done(pilot)
        assert (tmp_path / "workspace" / "edited.txt").read_text() == "edited\n" and not target.exists()
        card = list(chat.query(ToolCard))[-1]
        assert json.loads(card.arguments)["path"] == "edited.txt"
        calls = [m for m in app.agent.session.messages if m.get("tool_calls")]
        assert json.loads(calls[-1]["tool_calls"][0]["function"]["arguments"])["path"] == "edited.txt"

        # always: runs now and never asks again this session
        await H.send(pilot, "write 4")
        await _approval(pilot)
        await pilot.press("a")
        await H.turn_done(pilot)
        assert "write_file" in app.agent.policy.always_allowed
        target.unlink()
        await H.send(pilot, "write 5")
        await H.turn_done(pilot)
        assert not isinstance(app.screen, ApprovalScreen) and target.exists()
        await H.close(app)


@pytest.mark.asyncio
async def test_shell_asks_with_the_command_and_read_tools_do_not(endpoint, tmp_path: Path) -> None:
    app = H.build_app(endpoint.base_url, tmp_path)  # auto-read-only
    async with app.run_test(size=(140, 50)) as pilot:
        await H.send(pilot, "run it")
        dialog = await _approval(pilot)
        assert dialog.tool_name == "shell" and "echo hi from the shell" in dialog.preview
        assert "echo hi from the shell" in H.screen_text(app)
        await pilot.press("y")
        await H.turn_done(pilot)
        card = list(app.chat.query(ToolCard))[-1]
        assert card.status == "ok" and "hi from the shell" in (card.result or "")
        await H.send(pilot, "/approval ask")
        await H.send(pilot, "run again")
        await _approval(pilot)  # under "ask" every call asks
        await pilot.press("n")
        await H.turn_done(pilot)
        assert list(app.chat.query(ToolCard))[-1].status == "denied"
        await H.close(app)


@pytest.mark.asyncio
async def test_pasted_lines_stay_one_message(endpoint, tmp_path: Path) -> None:
    app = H.build_app(endpoint.base_url, tmp_path)
    async with app.run_test(size=(140, 50)) as pilot:
        prompt = app.chat.prompt
        prompt.focus()
        app.post_message(events.Paste("def f(x):\n    return x + 1"))  # as the terminal delivers it
        await pilot.pause()
        await pilot.press("ctrl+j", "w", "h", "y", "?")
        assert prompt.value == "def f(x):\n    return x + 1\nwhy?"
        await pilot.press("enter")
        await H.turn_done(pilot)
        assert endpoint.requests[-1]["messages"][-1]["content"] == "def f(x):\n    return x + 1\nwhy?"
        assert list(app.chat.query(UserMessage))[-1].text == "def f(x):\n    return x + 1\nwhy?"
        assert prompt.value == ""
        await H.close(app)


@pytest.mark.asyncio
async def test_slash_commands(endpoint, tmp_path: Path) -> None:
    app = H.build_app(endpoint.base_url, tmp_path)
    async with app.run_test(size=(140, 50)) as pilot:
        chat = app.chat
        # typing "/" lists the commands under the prompt
        chat.prompt.focus()
        await pilot.press("slash", "t")
        hints = chat.query_one("#hints")
        assert hints.display and [c.name for c in hints.matches] == ["think", "tools"]
        chat.prompt.value = ""
        await pilot.pause()
        assert not hints.display

        await H.send(pilot, "/think off")
        assert app.agent.session.thinking is False and chat.header.thinking is False
        await H.send(pilot, "/think")
        assert app.agent.session.thinking is True
        await H.send(pilot, "/think maybe")
        assert app.agent.session.thinking is True  # refused with a usage line

        await H.send(pilot, "/system Answer in French.")
        assert app.agent.session.system == "Answer in French."
        await H.send(pilot, "/model other-model")
        assert app.agent.client.model == "other-model" and "other-model@" in H.screen_text(app)
        await H.send(pilot, "hello")
        await H.turn_done(pilot)
        body = endpoint.requests[-1]
        assert body["model"] == "other-model"
        assert body["messages"][0] == {"role": "system", "content": "Answer in French."}

        await H.send(pilot, "/endpoint not-a-url")
        assert app.agent.client.base_url == endpoint.base_url
        with SE.ScriptedEndpoint(lambda body: Reply(content="from the second server")) as other:
            await H.send(pilot, f"/endpoint {other.base_url}")
            assert app.agent.client.base_url == other.base_url
            await H.send(pilot, "who are you?")
            await H.turn_done(pilot)
            assert len(other.requests) == 1
            assert list(chat.query(AnswerBlock))[-1].text == "from the second server"
        await H.send(pilot, f"/endpoint {endpoint.base_url}")

        await H.send(pilot, "/approval auto-all")
        assert app.agent.policy.mode == "auto-all"
        await H.send(pilot, "/tools")
        assert isinstance(app.screen, ToolsScreen)
        await pilot.press("m")  # cycles the approval mode
        assert app.agent.policy.mode == "ask"
        listing = H.screen_text(app)
        assert "write_file" in listing and "asks first" in listing and "mode ask" in listing
        app.screen.query_one("OptionList").highlighted = app.agent.tools.names().index("shell")
        await pilot.press("enter")  # always allow shell for this session
        assert app.agent.policy.always_allowed == {"shell"}
        assert "always allowed" in H.screen_text(app)
        await pilot.press("enter")
        assert app.agent.policy.always_allowed == set()
        await pilot.press("escape")
        await H.send(pilot, "/help")
        assert isinstance(app.screen, HelpScreen) and "/fork" in H.screen_text(app)
        await pilot.press("escape")

        await H.send(pilot, "/export")
        exported = tmp_path / f"dsv-chat-{app.agent.session.id}.md"
        await H.until(pilot, exported.exists, what="the export")
        assert "who are you?" in exported.read_text()
        await H.send(pilot, f"/export {tmp_path / 'out.md'}")
        assert (tmp_path / "out.md").read_text().startswith("# ")

        await H.send(pilot, "/save")
        assert app.agent.session.path.exists()
        await H.send(pilot, "/nonsense")
        assert not chat.busy and chat.prompt.value == ""
        await H.close(app)


@pytest.mark.asyncio
async def test_save_restart_resume_and_fork(endpoint, tmp_path: Path) -> None:
    app = H.build_app(endpoint.base_url, tmp_path)
    async with app.run_test(size=(140, 50)) as pilot:
        await H.send(pilot, "first question")
        await H.turn_done(pilot)
        await H.send(pilot, "second question")
        await H.turn_done(pilot)
        session_id = app.agent.session.id
        shown = [w.text for w in app.chat.query(UserMessage)]
        await H.close(app)
    assert shown == ["first question", "second question"]

    # a corrupt file beside it is listed with its error, not opened
    (tmp_path / "sessions" / "broken.json").write_text("{not json")
    # a new app (a restart): /resume opens the picker, enter opens the session as it was
    app = H.build_app(endpoint.base_url, tmp_path)
    async with app.run_test(size=(140, 50)) as pilot:
        chat = app.chat
        assert not list(chat.query(UserMessage))
        await pilot.press("ctrl+r")
        await H.until(pilot, lambda: isinstance(app.screen, SessionPickerScreen), what="the session picker")
        picker = app.screen
        assert [s.id for s in picker.sessions] == [session_id, "broken"]
        assert "broken  unreadable" in H.screen_text(app)
        await pilot.press("enter")
        await H.until(pilot, lambda: app.agent.session.id == session_id, what="the resumed session")
        await pilot.pause()
        assert [w.text for w in chat.query(UserMessage)] == ["first question", "second question"]
        assert [a.text for a in chat.query(AnswerBlock)] == ["echo: first question", "echo: second question"]
        blocks = list(chat.query(ReasoningBlock))
        assert [b.kept for b in blocks] == [False, True]  # the rule, also on a resumed session
        assert all(b.duration_s is not None for b in blocks)  # step times come back from turn_stats
        answers = list(chat.query(AnswerBlock))
        assert all(" in · " in a.stats and " out" in a.stats for a in answers)  # each turn's usage

        # up/down in the prompt walk the earlier messages
        chat.prompt.focus()
        await pilot.press("up")
        assert chat.prompt.value == "second question"
        await pilot.press("up", "up")
        assert chat.prompt.value == "first question"
        await pilot.press("down", "down")
        assert chat.prompt.value == ""

        # the conversation goes on where it was; the dropped reasoning is not sent
        await H.send(pilot, "third question")
        await H.turn_done(pilot)
        sent = endpoint.requests[-1]["messages"]
        assert [m.get("content") for m in sent if m["role"] == "user"] == ["first question", "second question",
                                                                            "third question"]  # fmt: skip
        assert not any(m.get("reasoning_content") for m in sent)

        # fork before the second question: a new session with the first turn, the text back in the prompt
        await pilot.press("ctrl+f")
        await H.until(pilot, lambda: isinstance(app.screen, ForkPickerScreen), what="the fork picker")
        await pilot.press("up", "up")  # the last turn is highlighted; go to turn 1... then down to turn 2
        await pilot.press("down", "enter")
        await H.until(pilot, lambda: app.agent.session.id != session_id, what="the fork")
        await pilot.pause()
        forked = app.agent.session
        assert forked.parent_id == session_id and forked.forked_at == 2
        assert [m["role"] for m in forked.messages] == ["user", "assistant"]
        assert chat.prompt.value == "second question"
        assert [w.text for w in chat.query(UserMessage)] == ["first question"]
        await H.send(pilot, "a different second question")
        await H.turn_done(pilot)
        assert [m.get("content") for m in endpoint.requests[-1]["messages"] if m["role"] == "user"] == [
            "first question", "a different second question"]  # fmt: skip
        # the parent is untouched on disk
        assert len(app.store.load(session_id).messages) == 6

        # /fork N and /resume ID work the same way without the pickers
        await H.send(pilot, "/fork 1")
        await H.until(pilot, lambda: app.agent.session.forked_at == 0, what="/fork 1")
        await H.send(pilot, f"/resume {session_id}")
        await H.until(pilot, lambda: app.agent.session.id == session_id, what="/resume ID")
        await H.send(pilot, "/new")
        await H.until(pilot, lambda: not app.agent.session.messages, what="/new")
        await pilot.pause()
        assert not list(chat.query(UserMessage))
        await H.close(app)


@pytest.mark.asyncio
async def test_command_palette_and_footer(endpoint, tmp_path: Path) -> None:
    app = H.build_app(endpoint.base_url, tmp_path)
    async with app.run_test(size=(160, 40)) as pilot:
        footer = H.screen_text(app).splitlines()[-1]
        for key in ("Thinking", "Context", "New", "Resume", "Fork", "Export", "Help", "Quit"):
            assert key in footer, key
        await pilot.press("ctrl+p")
        await pilot.pause()
        for ch in "fork":
            await pilot.press(ch)
        await H.until(pilot, lambda: "Branch a new session" in H.screen_text(app), what="the palette entry")
        await pilot.press("enter")
        await H.until(pilot, lambda: isinstance(app.screen, ForkPickerScreen), what="fork from the palette")
        assert "send a message first" in H.screen_text(app)
        await pilot.press("escape")
        await H.close(app)
