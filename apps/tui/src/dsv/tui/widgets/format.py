"""Number formats shared by the widgets: seconds, token counts and usage lines.

Durations go through one function so a test (or a snapshot) can inject a fixed formatter and
get a byte-stable screen; see ``ChatApp(format_seconds=...)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SecondsFormat = Callable[[float], str]


def format_seconds(seconds: float) -> str:
    """``0.42 s``, ``3.1 s``, ``2m05s``: short enough for a card title."""
    if seconds < 1:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest:02d}s"


def format_tokens(count: int | None) -> str:
    """``1,284`` (thousands separated), ``?`` when unknown."""
    return "?" if count is None else f"{count:,}"


def usage_line(usage: Any, latency_s: float | None, fmt: SecondsFormat) -> str:
    """``1.9 s · 412 in · 61 out (40 reasoning)`` from a :class:`dsv.tui.events.Usage` (or None)."""
    parts = []
    if latency_s is not None:
        parts.append(fmt(latency_s))
    if usage is not None:
        parts.append(f"{format_tokens(usage.prompt_tokens)} in")
        out = f"{format_tokens(usage.completion_tokens)} out"
        if getattr(usage, "reasoning_tokens", None):
            out += f" ({format_tokens(usage.reasoning_tokens)} reasoning)"
        parts.append(out)
        if getattr(usage, "cached_tokens", None):
            parts.append(f"{format_tokens(usage.cached_tokens)} cached")
    return " · ".join(parts)
