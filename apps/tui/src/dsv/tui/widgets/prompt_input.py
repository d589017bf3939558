"""The prompt: a TextArea, so pasted code keeps its lines (Textual's Input keeps only the first).

enter sends (:class:`~dsv.tui.messages.PromptSubmitted`), ctrl+j or shift+enter (where the terminal
tells them apart) starts a new line, up on the first line and down on the last walk the earlier
messages (:class:`~dsv.tui.messages.HistoryRequested`). It grows with its text up to a few lines.
TextArea's ctrl+e / ctrl+k are left to the chat (export, context panel), so the footer lists the
chat's keys in their order.
"""

from __future__ import annotations

import dataclasses

from textual.binding import Binding, BindingType
from textual.widgets import TextArea

from dsv.tui.messages import HistoryRequested, PromptSubmitted

# the chat's keys (export, context panel); TextArea binds them to end-of-line and delete-to-end
_CHAT_KEYS = frozenset({"ctrl+e", "ctrl+k"})


def _without(bindings: list[BindingType], keys: frozenset[str]) -> list[BindingType]:
    out: list[BindingType] = []
    for b in bindings:
        assert isinstance(b, Binding), "TextArea's bindings are Binding objects"
        kept = [k for k in b.key.split(",") if k.strip() not in keys]
        if kept:
            out.append(dataclasses.replace(b, key=",".join(kept)))
    return out


class PromptInput(TextArea, inherit_bindings=False):
    """``value`` is the text (an Input-like name for the chat and its tests)."""

    BINDINGS = [
        *_without(TextArea.BINDINGS, _CHAT_KEYS),
        # priority: TextArea would insert a newline for enter before a plain binding is looked at
        Binding("enter", "submit", "Send", show=False, priority=True),
        Binding("ctrl+j,shift+enter", "newline", "New line", show=False, priority=True),
    ]

    def __init__(self, *, placeholder: str = "", id: str | None = None) -> None:
        super().__init__(
            "", soft_wrap=True, tab_behavior="focus", show_line_numbers=False, placeholder=placeholder, id=id,
            compact=True,
        )  # fmt: skip

    @property
    def value(self) -> str:
        return self.text

    @value.setter
    def value(self, text: str) -> None:
        self.text = text
        self.move_cursor(self.document.end)

    def action_submit(self) -> None:
        self.post_message(PromptSubmitted(self.text))

    def action_newline(self) -> None:
        self.insert("\n")

    def action_cursor_up(self, select: bool = False) -> None:
        if not select and self.cursor_at_first_line:
            self.post_message(HistoryRequested(-1))
        else:
            super().action_cursor_up(select)

    def action_cursor_down(self, select: bool = False) -> None:
        if not select and self.cursor_at_last_line:
            self.post_message(HistoryRequested(1))
        else:
            super().action_cursor_down(select)
