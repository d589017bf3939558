"""A failed request or tool, said in words, with the key that retries it when retrying can help."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

# kind -> what the user should understand happened
_HEADINGS = {
    "connect": "Cannot reach the endpoint",
    "auth": "The endpoint refused the API key",
    "rate_limit": "Rate limited",
    "stream": "The answer stream broke off",
    "server": "The server failed",
    "tool": "A tool failed",
    "cancelled": "Stopped",
    "internal": "dsv chat failed (a bug; the session up to here is saved)",
}


def describe_error(kind: str, message: str, retry_after_s: float | None) -> str:
    """One readable line for an :class:`dsv.tui.events.AgentError`."""
    heading = _HEADINGS.get(kind, "Error")
    line = f"{heading}: {message}" if message else heading
    if retry_after_s is not None:
        line += f" (the server asks to wait {retry_after_s:g} s)"
    return line


class ErrorNotice(Static):
    """Shown in the transcript where the turn stopped; the session up to there is saved."""

    def __init__(
        self, *, kind: str, message: str, retry_after_s: float | None, retryable: bool, retry_key: str
    ) -> None:
        text = Text(describe_error(kind, message, retry_after_s))
        if retryable:
            text.append(f"   press {retry_key} to retry", style="bold")
        super().__init__(text, classes=f"error-notice -{kind}")
        self.kind = kind
        self.message = message
        self.retryable = retryable
