"""The two header lines: where the shell talks to and what it is doing right now.

Line one: model@endpoint, thinking on/off, the size of the next request in tokens, the session.
Line two: the agent's state (connecting, waiting, streaming, tool running, error with the retry
key, idle) and the last turn's usage and latency. States live here, where the eye already is,
rather than in a log.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static

from dsv.tui.widgets.format import format_tokens

# state -> (symbol, words, style); the words are what a screen reader or a test sees
_STATES: dict[str, tuple[str, str, str]] = {
    "idle": ("○", "ready", "green"),
    "connecting": ("◌", "connecting", "yellow"),
    "waiting": ("◔", "waiting for the model", "yellow"),
    "streaming": ("●", "streaming", "cyan"),
    "tool": ("⚙", "tool running", "magenta"),
    "approval": ("?", "waiting for your approval", "bold yellow"),
    "error": ("✗", "error", "bold red"),
}


def endpoint_label(base_url: str) -> str:
    """``127.0.0.1:8000`` for ``http://127.0.0.1:8000/v1``: the host is what tells endpoints apart."""
    parts = urlsplit(base_url)
    return parts.netloc or base_url


class StatusHeader(Static):
    """Header of the chat screen. Set the reactives; it redraws itself."""

    model: reactive[str] = reactive("")
    endpoint: reactive[str] = reactive("")
    thinking: reactive[bool] = reactive(True)
    context_tokens: reactive[int | None] = reactive(None)
    context_exact: reactive[bool] = reactive(False)
    session_label: reactive[str] = reactive("")
    state: reactive[str] = reactive("idle")
    detail: reactive[str] = reactive("")
    retry_key: reactive[str] = reactive("")
    last_turn: reactive[str] = reactive("")

    def render(self) -> Text:
        # two lines that never wrap: a long session title is cut, not pushed onto the state line
        line = Text(no_wrap=True, overflow="ellipsis")
        line.append(" dsv chat ", style="bold reverse")
        line.append(f" {self.model or '?'}@{endpoint_label(self.endpoint)} ", style="bold")
        line.append("│ ")
        line.append(f"thinking {'ON' if self.thinking else 'OFF'}", style="bold" if self.thinking else "dim")
        line.append(" │ ")
        exact = "" if self.context_exact else " (est.)"
        line.append(f"next request {format_tokens(self.context_tokens)} tok{exact}")
        if self.session_label:
            line.append(f" │ {self.session_label}", style="dim")
        line.append("\n")
        symbol, words, style = _STATES.get(self.state, ("·", self.state, ""))
        line.append(f" {symbol} {words}", style=style)
        if self.detail:
            line.append(f": {self.detail}", style=style)
        if self.state == "error" and self.retry_key:
            line.append(f"  [{self.retry_key}] retry", style="bold")
        if self.last_turn:
            line.append(f"   last turn {self.last_turn}", style="dim")
        return line
