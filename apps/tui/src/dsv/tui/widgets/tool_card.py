"""A tool call as a card: name, arguments, status, result and duration; expands for the details.

Collapsed, the title carries everything needed at a glance (``⚙ read_file {"path": …} · ✓ 0.12 s``);
expanded, the full arguments (pretty JSON when they parse) and the result as the model saw it.
"""

from __future__ import annotations

import json

from rich.text import Text
from textual.containers import Vertical
from textual.reactive import reactive
from textual.widgets import Collapsible, Static

from dsv.tui.widgets.format import SecondsFormat, format_seconds

# what the title shows of the arguments: enough to tell two calls apart
_ARGS_PREVIEW = 60


def pretty_arguments(arguments: str) -> str:
    """Arguments as indented JSON when they parse, else the raw text the model produced."""
    try:
        return json.dumps(json.loads(arguments), indent=2, ensure_ascii=False)
    except (TypeError, ValueError):
        return arguments


def one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class ToolCard(Collapsible):
    """One tool call. ``status`` is running, approval, ok, failed, denied, or returned (a call read
    back from a saved session, whose success the message does not record)."""

    status: reactive[str] = reactive("running")

    def __init__(
        self,
        *,
        call_id: str,
        name: str,
        arguments: str,
        collapsed: bool = True,
        fmt: SecondsFormat = format_seconds,
    ) -> None:
        self._args = Static(Text(pretty_arguments(arguments)), classes="tool-args")
        self._result = Static(Text("…"), classes="tool-result")
        body = Vertical(self._args, self._result, classes="tool-body")
        super().__init__(body, title=name, collapsed=collapsed, classes="tool-card")
        self.call_id = call_id
        self.tool_name = name
        self.arguments = arguments
        self.result: str | None = None
        self.duration_s: float | None = None
        self.truncated = False
        self._fmt = fmt

    def on_mount(self) -> None:
        self._relabel()

    def set_arguments(self, arguments: str) -> None:
        """Arguments changed (the user edited them in the approval dialog)."""
        self.arguments = arguments
        self._args.update(Text(pretty_arguments(arguments)))
        self._relabel()

    def finish(
        self, *, ok: bool | None, result: str, duration_s: float | None, truncated: bool = False
    ) -> None:
        """The call returned (or failed, or was denied; ``ok=None``: unknown, from a saved session)."""
        self.result = result
        self.duration_s = duration_s
        self.truncated = truncated
        shown = Text()
        if truncated:  # first: a long result scrolls inside the card, and this must not scroll away
            shown.append(f"[output truncated to {len(result):,} chars: what the model saw]\n", style="italic yellow")
        shown.append(result)
        self._result.update(shown)
        if self.status != "denied":
            self.status = "returned" if ok is None else "ok" if ok else "failed"
        self._relabel()

    def watch_status(self, status: str) -> None:
        for name in ("running", "approval", "ok", "failed", "denied", "returned"):
            self.set_class(name == status, f"-{name}")
        self._relabel()

    def _relabel(self) -> None:
        mark = {
            "running": "… running",
            "approval": "? awaiting approval",
            "ok": "✓",
            "failed": "✗ failed",
            "denied": "⊘ denied",
            "returned": "↩ returned",
        }[self.status]
        duration = f" {self._fmt(self.duration_s)}" if self.duration_s is not None else ""
        cut = " · truncated" if self.truncated else ""
        self.title = f"⚙ {self.tool_name} {one_line(self.arguments, _ARGS_PREVIEW)} · {mark}{duration}{cut}"
