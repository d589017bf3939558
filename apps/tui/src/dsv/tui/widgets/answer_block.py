"""The assistant's answer text, rendered as Markdown while it streams."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Markdown, Static
from textual.widgets._markdown import MarkdownStream


class AnswerBlock(Vertical):
    """``▸ dsv`` with the answer as Markdown and, when the turn ends, a line of usage and latency.

    Streaming goes through Textual's :class:`MarkdownStream`, which batches fragments that arrive
    faster than the document can be re-parsed (a token a millisecond from a local server).
    """

    def __init__(self, text: str = "", *, step: int | None = None) -> None:
        super().__init__(classes="answer")
        self.text = text
        self.step = step
        self._markdown = Markdown(text, classes="answer-markdown")
        self._stats = Static("", classes="answer-stats")
        self._stream: MarkdownStream | None = None
        self.stats = ""
        self.border_title = "dsv"

    def compose(self) -> ComposeResult:
        yield self._markdown
        yield self._stats

    async def append(self, text: str) -> None:
        """Add a streamed fragment."""
        self.text += text
        if self._stream is None:
            self._stream = Markdown.get_stream(self._markdown)
        await self._stream.write(text)

    async def close(self) -> None:
        """Flush what is pending; the block stays as is."""
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.stop()

    def set_stats(self, line: str) -> None:
        """The turn's usage and latency under the answer."""
        self.stats = line
        self._stats.update(line)
        self._stats.display = bool(line)

    def on_mount(self) -> None:
        self._stats.display = bool(self.stats)
