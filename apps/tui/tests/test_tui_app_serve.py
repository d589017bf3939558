"""dsv chat against a real ``dsv serve`` on 127.0.0.1 with a tiny checkpoint (random weights).

The model's words are noise, but everything else is real: the server streams through its engine
process, the thinking switch goes out in the request, the context panel's counts come from the
server's /tokenize (exact, not estimated), and the reasoning of one turn is dropped from the next
request. Marked slow: starting the server (torch, the engine process) takes tens of seconds on a
shared CPU.

Run: ``pytest apps/tui/tests/test_tui_app_serve.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tui_pilot

from dsv.tui.widgets import AnswerBlock, ContextRowView, DroppedView, ReasoningBlock

pytest.importorskip("dsv.serve", reason="needs dsv-serve (pip install 'dsv-tui[serve]')")


H = tui_pilot  # shared app-test helpers beside this file (on sys.path in prepend mode)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    from dsv.tui.local_serve import LocalServer, ensure_default_model

    root = tmp_path_factory.mktemp("serve")
    checkpoint = ensure_default_model(root / "chat-tiny")
    with LocalServer(checkpoint, model_name="tiny", log_dir=root / "logs") as server:
        yield server


@pytest.mark.slow
@pytest.mark.asyncio
async def test_chat_with_dsv_serve(served, tmp_path: Path) -> None:
    # Greedy: the same tokens every run. Sampled, the random model now and then wrote </think> inside
    # the first turn's 12 tokens, and that turn got an answer block of its own.
    app = H.build_app(served.base_url, tmp_path, model="tiny", max_tokens=12, temperature=0.0)
    async with app.run_test(size=(140, 45)) as pilot:
        chat = app.chat
        assert "tiny@127.0.0.1" in H.screen_text(app)
        await H.send(pilot, "hi", type_it=True)
        await H.turn_done(pilot, timeout=120)
        session = app.agent.session
        assert [m["role"] for m in session.messages] == ["user", "assistant"]
        first = session.messages[1]
        # thinking on: the tiny model's tokens stream into the reasoning block (its own words)
        (block,) = chat.query(ReasoningBlock)
        assert block.text and block.text == first.get("reasoning_content") and block.kept
        stats = session.turn_stats[-1]
        assert stats["usage"]["completion_tokens"] == 12  # max_tokens reached
        assert chat.header.state == "idle" and "12 out" in chat.header.last_turn

        # counts from the server's tokenizer, shown as exact
        panel = chat.context_panel
        assert panel.view is not None and panel.view.exact
        assert panel.border_subtitle == "exact (tokenizer)" and "(est.)" not in str(chat.header.render())
        exact = app.agent.client.tokenize_sync(app.agent.next_request_messages(), tools=app.agent.tools.schemas(),
                                               thinking=True)  # fmt: skip
        assert panel.view.total_tokens == exact
        assert panel.view.rows[0].tool_schemas == len(app.agent.tools.names())  # counted in the first row

        # thinking off for the next message: plain content, rendered as Markdown; the first
        # turn's reasoning is no longer sent and the panel lists it as dropped
        await H.send(pilot, "/think off")
        await H.send(pilot, "and now?")
        await H.turn_done(pilot, timeout=120)
        (answer,) = chat.query(AnswerBlock)
        assert answer.text == session.messages[-1]["content"] != ""
        assert not block.kept and "dropped" in str(block.title)
        assert [d.dropped.message_index for d in panel.query(DroppedView)] == [1]
        rows = [r.row for r in panel.query(ContextRowView)]
        assert [r.role for r in rows] == ["user", "assistant", "user", "assistant"]
        assert all(r.reasoning is None for r in rows)
        await H.close(app)
