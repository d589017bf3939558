"""Pick a saved session to resume (/resume, ctrl+r): newest first, with title, time and size."""

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


def session_label(info: Any) -> Text:
    """``title  ·  2026-12-07 14:02  ·  3 turns, 12 messages  ·  model`` for a SessionInfo (an
    unreadable file: its name and what is wrong with it)."""
    text = Text()
    if info.error:
        text.append(f"{info.id}  unreadable: {info.error}", style="red")
        return text
    text.append(info.title or "(untitled)", style="bold")
    facts = [info.updated.replace("T", " ")[:16], f"{info.n_turns} turns, {info.n_messages} messages"]
    if info.model:
        facts.append(info.model)
    if info.parent_id:
        facts.append(f"fork of {info.parent_id}")
    text.append("  ·  " + "  ·  ".join(facts), style="dim")
    return text


class SessionPickerScreen(ModalScreen[str | None]):
    """Dismisses with the chosen session id, or None."""

    CSS_PATH = "session_picker.tcss"
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, sessions: list[Any], *, current_id: str | None = None) -> None:
        super().__init__()
        self.sessions = sessions
        self.current_id = current_id

    def compose(self) -> ComposeResult:
        with Vertical(id="picker-dialog"):
            yield Label("Resume a session  (enter: open, esc: cancel)", id="picker-title")
            if self.sessions:
                yield OptionList(
                    *[
                        Option(session_label(s), id=str(s.id), disabled=bool(s.error) or str(s.id) == self.current_id)
                        for s in self.sessions
                    ],
                    id="picker-list",
                )
            else:
                yield Label("No saved sessions yet.", id="picker-empty")

    @on(OptionList.OptionSelected)
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_cancel(self) -> None:
        self.dismiss(None)
