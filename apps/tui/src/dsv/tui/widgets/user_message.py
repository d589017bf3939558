"""A user message in the transcript."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static


class UserMessage(Static):
    """``▸ you`` and the text as typed (no Markdown: what was sent is shown verbatim)."""

    def __init__(self, text: str, *, message_index: int | None = None) -> None:
        super().__init__(Text(text))
        self.text = text
        self.message_index = message_index
        self.border_title = "you"
