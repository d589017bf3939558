"""The Textual messages of dsv chat, in one place.

The agent's own events (``dsv.tui.events``) are plain dataclasses; the turn worker wraps each in
:class:`AgentEventPosted` so the chat screen draws them on its own message queue, in order, while
the worker is already reading the next chunk.
"""

from __future__ import annotations

from typing import Any

from textual.message import Message


class AgentEventPosted(Message):
    """One event from ``Agent.run_turn`` (``dsv.tui.events``), for the chat screen to draw."""

    def __init__(self, event: Any) -> None:
        super().__init__()
        self.event = event


class PromptSubmitted(Message):
    """The prompt's enter: ``text`` as typed (several lines when pasted or ctrl+j was used)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class HistoryRequested(Message):
    """Up on the prompt's first line (``delta=-1``) or down on its last (``+1``)."""

    def __init__(self, delta: int) -> None:
        super().__init__()
        self.delta = delta


class TurnEnded(Message):
    """The turn worker is done (answered, failed or stopped); the prompt takes input again."""

    def __init__(self, *, ok: bool) -> None:
        super().__init__()
        self.ok = ok


class SessionSwitched(Message):
    """The agent now works on another session (/new, /resume, /fork): redraw everything."""

    def __init__(self, session: Any, *, prompt_text: str = "") -> None:
        super().__init__()
        self.session = session
        self.prompt_text = prompt_text
