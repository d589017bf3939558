"""The conversation: user messages, reasoning blocks, tool cards, answers and errors, in order.

Two ways in: :meth:`Transcript.load` draws a saved session (resume, fork, restart), and the
``on_*`` methods draw a turn as the agent's events arrive. Both put reasoning on the same side of
the thinking-with-tools rule: a block after the last user message is ``kept``, earlier ones are
``dropped`` (and collapsed).
"""

from __future__ import annotations

from typing import Any

from textual.containers import VerticalScroll
from textual.widget import Widget

from dsv.core.chat import last_user_index
from dsv.tui.events import Usage
from dsv.tui.widgets.answer_block import AnswerBlock
from dsv.tui.widgets.error_notice import ErrorNotice
from dsv.tui.widgets.format import SecondsFormat, format_seconds, usage_line
from dsv.tui.widgets.reasoning_block import ReasoningBlock
from dsv.tui.widgets.tool_card import ToolCard
from dsv.tui.widgets.user_message import UserMessage


def _text(content: Any) -> str:
    if isinstance(content, list):  # OpenAI content parts
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content or "")


def _stats_by_message(
    messages: list[dict[str, Any]], turn_stats: list[dict[str, Any]], fmt: SecondsFormat
) -> tuple[dict[int, tuple[int | None, float | None]], dict[int, str]]:
    """From a session's ``turn_stats``: (assistant message index -> (reasoning tokens, seconds)) for
    each recorded step, and (``end_message`` -> the turn's usage line)."""
    steps: dict[int, tuple[int | None, float | None]] = {}
    ends: dict[int, str] = {}
    for turn in turn_stats:
        start, end = turn.get("user_message"), turn.get("end_message")
        if not isinstance(start, int) or not isinstance(end, int):
            continue
        assistants = [i for i in range(start + 1, min(end, len(messages))) if messages[i].get("role") == "assistant"]
        for i, rec in zip(assistants, turn.get("steps") or [], strict=False):
            usage = rec.get("usage") or {}
            steps[i] = (usage.get("reasoning_tokens"), rec.get("latency_s"))
        if "error" not in turn:
            usage = turn.get("usage")
            ends[end] = usage_line(Usage(**usage) if isinstance(usage, dict) else None, turn.get("latency_s"), fmt)
    return steps, ends


class Transcript(VerticalScroll):
    """Follows the stream while the view is at the bottom; scrolled up, it stays where the user is.

    (Not Textual's ``anchor()``: that pins a short conversation to the bottom of the view.)"""

    def __init__(self, *, fmt: SecondsFormat = format_seconds, id: str | None = None) -> None:
        super().__init__(id=id, classes="transcript")
        self.fmt = fmt
        self._reasoning: dict[int, ReasoningBlock] = {}
        self._answers: dict[int, AnswerBlock] = {}
        self._cards: dict[str, ToolCard] = {}

    def _follow(self) -> None:
        if self.scroll_y >= self.max_scroll_y - 1:
            self.call_after_refresh(self.scroll_end, animate=False, immediate=True)

    # -- a saved session ---------------------------------------------------------------------

    async def load(self, messages: list[dict[str, Any]], turn_stats: list[dict[str, Any]] | None = None) -> None:
        """Replace everything with ``messages`` (OpenAI shape, as a Session stores them); the
        session's ``turn_stats`` put each step's time and reasoning tokens on its block and each
        turn's usage under its answer, as when it ran."""
        await self.remove_children()
        self._new_turn()
        last_user = last_user_index(messages)
        widgets: list[Widget] = []
        cards: dict[str, ToolCard] = {}
        step = 0
        steps, turn_end = _stats_by_message(messages, turn_stats or [], self.fmt)
        answer: AnswerBlock | None = None
        for i, m in enumerate(messages):
            role = m.get("role")
            if i in turn_end and answer is not None:
                answer.set_stats(turn_end[i])
            if role in ("user", "developer"):
                widgets.append(UserMessage(_text(m.get("content")), message_index=i))
                step = 0
                answer = None
            elif role == "assistant":
                step += 1
                kept = i > last_user
                if m.get("reasoning_content"):
                    block = ReasoningBlock(
                        m["reasoning_content"], step=step, kept=kept, collapsed=not kept, fmt=self.fmt
                    )
                    if i in steps:
                        block.finish(tokens=steps[i][0], duration_s=steps[i][1])
                    widgets.append(block)
                if _text(m.get("content")).strip():
                    answer = AnswerBlock(_text(m.get("content")), step=step)
                    widgets.append(answer)
                for call in m.get("tool_calls") or []:
                    fn = call.get("function") or {}
                    card = ToolCard(
                        call_id=str(call.get("id", "")),
                        name=str(fn.get("name", "?")),
                        arguments=str(fn.get("arguments", "")),
                        fmt=self.fmt,
                    )
                    cards[card.call_id] = card
                    widgets.append(card)
            elif role == "tool":
                card = cards.get(str(m.get("tool_call_id", "")))
                if card is not None:
                    card.finish(ok=None, result=_text(m.get("content")), duration_s=None)
        if len(messages) in turn_end and answer is not None:
            answer.set_stats(turn_end[len(messages)])
        await self.mount_all(widgets)
        # the live turn continues the last one when the session ends inside a tool loop
        self._cards = {k: v for k, v in cards.items() if v.result is None}
        self.scroll_end(animate=False)

    # -- a live turn -------------------------------------------------------------------------

    def new_attempt(self) -> None:
        """A retry draws its steps below the error, in new blocks (the failed ones stay as shown)."""
        self._new_turn()

    def _new_turn(self) -> None:
        self._reasoning.clear()
        self._answers.clear()
        self._cards.clear()

    async def add_user(self, text: str, *, message_index: int | None = None) -> UserMessage:
        """A new user message: earlier reasoning moves to ``dropped`` (the V3.2 rule)."""
        for block in self.query(ReasoningBlock):
            if block.kept:
                block.kept = False
                block.collapsed = True
        self._new_turn()
        await self.query(".welcome").remove()
        self._follow()
        widget = UserMessage(text, message_index=message_index)
        await self.mount(widget)
        return widget

    async def on_reasoning(self, step: int, text: str) -> None:
        self._follow()
        block = self._reasoning.get(step)
        if block is None:
            block = self._reasoning[step] = ReasoningBlock(step=step, fmt=self.fmt)
            await self.mount(block)
        block.append(text)

    async def on_content(self, step: int, text: str) -> None:
        self._follow()
        answer = self._answers.get(step)
        if answer is None:
            answer = self._answers[step] = AnswerBlock(step=step)
            await self.mount(answer)
        await answer.append(text)

    async def on_tool_started(self, call_id: str, name: str, arguments: str) -> ToolCard:
        self._follow()
        card = self._cards.get(call_id)
        if card is None:
            card = self._cards[call_id] = ToolCard(call_id=call_id, name=name, arguments=arguments, fmt=self.fmt)
            await self.mount(card)
        return card

    def tool_card(self, call_id: str) -> ToolCard | None:
        return self._cards.get(call_id)

    async def finish_step(self, step: int, *, reasoning_tokens: int | None, latency_s: float | None) -> None:
        block = self._reasoning.get(step)
        if block is not None:
            block.finish(tokens=reasoning_tokens, duration_s=latency_s)
        answer = self._answers.get(step)
        if answer is not None:
            await answer.close()

    async def finish_turn(self, stats: str) -> None:
        """Close every stream of the turn; ``stats`` goes under the last answer."""
        for answer in self._answers.values():
            await answer.close()
        if self._answers:
            self._answers[max(self._answers)].set_stats(stats)

    async def add_error(
        self, *, kind: str, message: str, retry_after_s: float | None, retryable: bool, retry_key: str
    ) -> ErrorNotice:
        for answer in self._answers.values():
            await answer.close()
        self._follow()
        notice = ErrorNotice(
            kind=kind, message=message, retry_after_s=retry_after_s, retryable=retryable, retry_key=retry_key
        )
        await self.mount(notice)
        return notice
