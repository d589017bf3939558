"""Pick the user message to branch from (/fork, ctrl+f).

The fork keeps every message before the chosen one, in a new session that records its parent; the
chosen message's text is put back in the prompt, to send as is or change.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, OptionList
from textual.widgets.option_list import Option


def user_turns(messages: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(index in messages, text) of each user message."""
    return [(i, str(m.get("content") or "")) for i, m in enumerate(messages) if m.get("role") == "user"]


class ForkPickerScreen(ModalScreen[int | None]):
    """Dismisses with the index of the chosen user message, or None."""

    CSS_PATH = "fork_picker.tcss"
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, messages: list[dict[str, Any]]) -> None:
        super().__init__()
        self.turns = user_turns(messages)

    def compose(self) -> ComposeResult:
        with Vertical(id="picker-dialog"):
            yield Label("Fork: branch a new session before which message?  (enter / esc)", id="picker-title")
            if self.turns:
                options = []
                for n, (index, text) in enumerate(self.turns, start=1):
                    label = Text()
                    label.append(f"turn {n}  ", style="bold")
                    label.append(" ".join(text.split())[:80])
                    options.append(Option(label, id=str(index)))
                yield OptionList(*options, id="picker-list")
            else:
                yield Label("Nothing to fork yet: send a message first.", id="picker-empty")

    def on_mount(self) -> None:
        if self.turns:
            self.query_one(OptionList).highlighted = len(self.turns) - 1

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(int(str(event.option.id)))

    def action_cancel(self) -> None:
        self.dismiss(None)
