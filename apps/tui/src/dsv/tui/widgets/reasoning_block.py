"""The reasoning of one step: dimmed, collapsible, and labelled with whether it is still sent.

DeepSeek-V3.2 keeps an assistant's ``reasoning_content`` in the context across the tool calls of
one user turn and drops it once a new user message arrives (``dsv.core.chat.apply_thinking_context``).
Each block says which side of that rule it is on: ``kept`` while its turn is the current one,
``dropped`` after the next user message, so what the model will see again is visible.
"""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Collapsible, Static

from dsv.tui.widgets.format import SecondsFormat, format_seconds, format_tokens


class ReasoningBlock(Collapsible):
    """One step's reasoning. ``append`` while it streams, ``finish`` when the step ends."""

    kept: reactive[bool] = reactive(True)

    def __init__(
        self,
        text: str = "",
        *,
        step: int,
        kept: bool = True,
        collapsed: bool = False,
        fmt: SecondsFormat = format_seconds,
    ) -> None:
        self._body = Static(Text(text), classes="reasoning-text")
        super().__init__(self._body, title="thinking", collapsed=collapsed, classes="reasoning")
        self.text = text
        self.step = step
        self.tokens: int | None = None
        self.duration_s: float | None = None
        self._fmt = fmt
        self.set_reactive(ReasoningBlock.kept, kept)

    def on_mount(self) -> None:
        self._relabel()

    def append(self, text: str) -> None:
        """Add streamed reasoning text."""
        self.text += text
        self._body.update(Text(self.text))

    def finish(self, *, tokens: int | None, duration_s: float | None) -> None:
        """The step ended: show its reasoning size and time."""
        self.tokens = tokens
        self.duration_s = duration_s
        self._relabel()

    def watch_kept(self, kept: bool) -> None:
        self.set_class(not kept, "dropped")
        self._relabel()

    def _relabel(self) -> None:
        facts = [f"step {self.step}"]
        if self.duration_s is not None:
            facts.append(self._fmt(self.duration_s))
        if self.tokens:
            facts.append(f"{format_tokens(self.tokens)} tok")
        rule = "kept this turn" if self.kept else "dropped (new user message)"
        self.title = f"thinking ({', '.join(facts)}) · {rule}"
