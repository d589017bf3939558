"""Snapshot tests (pytest-textual-snapshot) of the main screens of dsv chat.

Each drives the real app against the scripted server on 127.0.0.1 and compares the SVG screen with
the one under ``__snapshots__/``. What would vary between runs is pinned: durations go through a
fixed formatter, session times and ids are fixed, the server's port is shown as 8000.

Update after a deliberate UI change (then look at the SVGs before committing them):
``pytest apps/tui/tests/test_tui_snapshots.py --snapshot-update``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tui_pilot

from dsv.synth.eval._io import atomic_write_json
from dsv.tui.screens import ApprovalScreen, SessionPickerScreen
from dsv.tui.session import Session

H = tui_pilot  # shared app-test helpers beside this file (on sys.path in prepend mode)
SE = H.load_scripted_endpoint()
Reply = SE.Reply
SIZE = (130, 40)
SHOWN_URL = "http://127.0.0.1:8000/v1"


def weather_script(body: dict[str, Any]) -> Any:
    last = body["messages"][-1]
    if last["role"] == "tool":
        return Reply(
            content="Tomorrow in Paris: high **52 °F**, low **39 °F**.\n\n- 11 °C is 51.8 °F\n- 4 °C is 39.2 °F",
            reasoning_content="11 °C is 51.8 °F; 4 °C is 39.2 °F. Round to whole degrees.",
            reasoning_tokens=14,
        )
    if "write" in str(last.get("content")):
        args = {"path": "plan.md", "content": "# Plan\n\n1. pack\n2. fly\n"}
        return Reply(content="", reasoning_content="Write the plan file.", tool_calls=[{"name": "write_file", "arguments": args}])
    return Reply(
        content="",
        reasoning_content="The user wants tomorrow's forecast in °F; read the forecast file, then convert.",
        tool_calls=[{"name": "read_file", "arguments": {"path": "forecast.json"}}],
        reasoning_tokens=17,
    )


@pytest.fixture
def endpoint():
    with SE.ScriptedEndpoint(weather_script) as ep:
        yield ep


def _app(endpoint: Any, root: Path, **kwargs: Any) -> Any:
    (root / "workspace").mkdir(parents=True, exist_ok=True)
    (root / "workspace" / "forecast.json").write_text('{"city": "Paris", "high_c": 11, "low_c": 4}\n')
    app = H.build_app(endpoint.base_url, root, fixed_times=True, **kwargs)
    app.agent.session.id = "20261207-140200-a1b2c3"
    return app


async def _pin(pilot: Any) -> None:
    """Show the port and times that vary as fixed values."""
    await H.probed(pilot)
    chat = pilot.app.chat
    chat.prompt.cursor_blink = False  # the blink phase would depend on timing
    chat.header.endpoint = SHOWN_URL
    session = pilot.app.agent.session
    session.created = session.updated = H.FIXED_CREATED
    chat.header.session_label = pilot.app.session_label(session)
    await pilot.pause()


def test_empty_chat(endpoint, tmp_path: Path, snap_compare) -> None:
    app = _app(endpoint, tmp_path, show_context=False)
    assert snap_compare(app, terminal_size=SIZE, run_before=_pin)


def test_thinking_with_tools_turn_with_context_panel(endpoint, tmp_path: Path, snap_compare) -> None:
    app = _app(endpoint, tmp_path, show_context=True)

    async def run(pilot: Any) -> None:
        await H.send(pilot, "What is the weather in Paris tomorrow, in °F?")
        await H.turn_done(pilot)
        card = pilot.app.chat.query_one("ToolCard")
        card.collapsed = False
        await _pin(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run)


def test_approval_modal(endpoint, tmp_path: Path, snap_compare) -> None:
    app = _app(endpoint, tmp_path, show_context=False)

    async def run(pilot: Any) -> None:
        await H.send(pilot, "write a travel plan")
        await H.until(pilot, lambda: isinstance(pilot.app.screen, ApprovalScreen), what="the approval dialog")
        await _pin(pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run)


def test_session_picker(endpoint, tmp_path: Path, snap_compare) -> None:
    sessions = tmp_path / "sessions"
    for n, (title, updated) in enumerate([("Weather in Paris", "2026-12-06T09:15:00+00:00"),
                                          ("Refactor the tokenizer", "2026-12-07T11:40:00+00:00")]):  # fmt: skip
        s = Session(id=f"2026120{6 + n}-0900-{n:06d}", title=title, created=updated, updated=updated,
                    endpoint=SHOWN_URL, model="tiny", root=sessions)  # fmt: skip
        s.messages = [{"role": "user", "content": title}, {"role": "assistant", "content": "ok"}]
        atomic_write_json(s.path, s.to_dict())
    app = _app(endpoint, tmp_path, show_context=False)

    async def run(pilot: Any) -> None:
        await _pin(pilot)
        await pilot.press("ctrl+r")
        await H.until(pilot, lambda: isinstance(pilot.app.screen, SessionPickerScreen), what="the picker")
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=run)


def test_help(endpoint, tmp_path: Path, snap_compare) -> None:
    app = _app(endpoint, tmp_path, show_context=False)

    async def run(pilot: Any) -> None:
        await _pin(pilot)
        await pilot.press("f1")
        await pilot.pause()

    assert snap_compare(app, terminal_size=SIZE, run_before=run)


def readme_script(body: dict[str, Any]) -> Any:
    """Two turns: read a file, then compute with the sandboxed python tool (for the README picture)."""
    messages = body["messages"]
    last = messages[-1]
    users = [m for m in messages if m["role"] == "user"]
    if last["role"] == "tool" and len(users) == 1:
        return Reply(content="Paris tomorrow: high **11 °C**, low **4 °C**.",
                     reasoning_content="The file has high_c 11 and low_c 4 for Paris.", reasoning_tokens=14)  # fmt: skip
    if last["role"] == "tool":
        return Reply(content="In Fahrenheit: high **51.8 °F**, low **39.2 °F**.",
                     reasoning_content="The sandbox printed 51.8 and 39.2; answer with both.", reasoning_tokens=13)  # fmt: skip
    if len(users) == 1:
        return Reply(content="", reasoning_content="Read forecast.json first.", reasoning_tokens=6,
                     tool_calls=[{"name": "read_file", "arguments": {"path": "forecast.json"}}])  # fmt: skip
    code = "for c in (11, 4):\n    print(round(c * 9 / 5 + 32, 1))"
    return Reply(content="", reasoning_content="Convert both with F = C × 9/5 + 32; let python do it.",
                 reasoning_tokens=16, tool_calls=[{"name": "python", "arguments": {"code": code}}])  # fmt: skip


def save_readme_screenshot(out: Path) -> None:
    """apps/tui/docs/thinking-with-tools.svg: a thinking-with-tools turn after an earlier one, the
    context panel showing the earlier reasoning dropped and this turn's kept."""
    import asyncio
    import tempfile

    async def run() -> None:
        with SE.ScriptedEndpoint(readme_script) as endpoint, tempfile.TemporaryDirectory() as tmp:
            app = _app(endpoint, Path(tmp), show_context=True, approval="auto-all")
            async with app.run_test(size=(150, 46)) as pilot:
                await H.send(pilot, "What is the weather in Paris tomorrow?")
                await H.turn_done(pilot)
                await H.send(pilot, "And in °F?")
                await H.turn_done(pilot, timeout=60)
                for card in pilot.app.chat.query("ToolCard"):
                    card.collapsed = card.tool_name != "python"
                await _pin(pilot)
                pilot.app.chat.transcript.scroll_end(animate=False)
                await pilot.pause()
                out.write_text(pilot.app.export_screenshot(title="dsv chat"))
                await H.close(pilot.app)

    asyncio.run(run())


if __name__ == "__main__":
    target = Path(__file__).resolve().parents[1] / "docs" / "thinking-with-tools.svg"
    target.parent.mkdir(exist_ok=True)
    save_readme_screenshot(target)
    print(f"wrote {target}")
