"""The context panel: exactly the messages the next request sends, with their token counts.

The rows are the agent's ``next_request_messages()`` (or, while a turn runs, the
``TurnStarted.request_messages`` actually sent), so the thinking-with-tools rule is shown, not
restated: an assistant message of the current turn lists its reasoning as ``kept``; reasoning the
session holds but the request no longer carries (turns before the last user message) is listed
under ``dropped``. Counts are exact when the endpoint tokenizes (dsv serve's /tokenize), else an
estimate, and the title says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from dsv.tui.widgets.format import format_tokens


@dataclass
class ContextRow:
    """One message of the next request."""

    index: int
    role: str
    tokens: int | None
    reasoning: str | None = None  # "kept" when the message carries reasoning_content
    tool_calls: list[str] = field(default_factory=list)  # names
    result_of: str | None = None  # for a tool message: the name of the tool it answers
    preview: str = ""
    tool_schemas: int = 0  # the first row's count includes the rendered schemas of this many tools


@dataclass
class DroppedReasoning:
    """Reasoning the session holds that the next request does not send."""

    message_index: int  # in the session's messages
    chars: int
    tokens: int | None


@dataclass
class ContextView:
    """What the panel shows; built by :func:`context_view`."""

    rows: list[ContextRow]
    dropped: list[DroppedReasoning]
    total_tokens: int | None
    exact: bool

    @property
    def kept_reasoning(self) -> int:
        return sum(1 for r in self.rows if r.reasoning == "kept")


def _preview(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, list):  # content parts
        content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return " ".join(str(content or "").split())[:16]


def context_view(
    request: list[dict[str, Any]],
    history: list[dict[str, Any]],
    counts: list[int] | None,
    *,
    exact: bool,
    dropped_tokens: dict[int, int] | None = None,
    tool_count: int = 0,
) -> ContextView:
    """Rows for ``request`` and the reasoning of ``history`` that ``request`` leaves out.

    ``history`` is the session's messages (plus a pending user message, when one is being sent);
    the request is ``[system] + rule(history)``, so the two align from the end. Exact counts are
    the growth of the encoded prompt, so the first message's count includes the ``tool_count``
    tool schemas rendered before it; its row says so.
    """
    rows = []
    names: dict[str, str] = {}  # tool_call_id -> tool name, to say what a result answers
    for i, m in enumerate(request):
        calls = []
        for c in m.get("tool_calls") or []:
            name = str((c.get("function") or {}).get("name", "?"))
            names[str(c.get("id"))] = name
            calls.append(name)
        rows.append(
            ContextRow(
                index=i,
                role=str(m.get("role", "?")),
                tokens=counts[i] if counts is not None and i < len(counts) else None,
                reasoning="kept" if m.get("reasoning_content") else None,
                tool_calls=calls,
                result_of=names.get(str(m.get("tool_call_id")), "?") if m.get("role") == "tool" else None,
                preview=_preview(m),
            )
        )
    if rows and exact and tool_count:
        rows[0].tool_schemas = tool_count
    dropped = []
    offset = len(request) - len(history)
    for j, m in enumerate(history):
        reasoning = m.get("reasoning_content")
        if m.get("role") != "assistant" or not reasoning:
            continue
        i = j + offset
        sent = request[i] if 0 <= i < len(request) else {}
        if not sent.get("reasoning_content"):
            dropped.append(DroppedReasoning(j, len(reasoning), (dropped_tokens or {}).get(j)))
    total = sum(counts) if counts is not None else None
    return ContextView(rows=rows, dropped=dropped, total_tokens=total, exact=exact)


def _row_text(row: ContextRow) -> Text:
    text = Text()
    text.append(f"{row.role:<10}", style="bold")
    text.append(f"{format_tokens(row.tokens):>7} tok", style="cyan")
    if row.preview:
        text.append(f"  {row.preview}", style="dim")
    if row.reasoning == "kept":
        text.append("\n  ├ reasoning ✓ kept", style="green")
    for name in row.tool_calls:
        text.append(f"\n  ├ tool call {name}", style="magenta")
    if row.result_of:
        text.append(f"\n  └ result of {row.result_of}", style="dim")
    if row.tool_schemas:
        text.append(f"\n  └ incl. {row.tool_schemas} tool schemas", style="dim")
    return text


class ContextRowView(Static):
    """A message of the next request (its data in ``row``)."""

    def __init__(self, row: ContextRow) -> None:
        super().__init__(_row_text(row), classes=f"context-row -{row.role}")
        self.row = row


class DroppedView(Static):
    """A reasoning block the next request leaves out."""

    def __init__(self, dropped: DroppedReasoning) -> None:
        size = f"{format_tokens(dropped.tokens)} tok" if dropped.tokens is not None else f"{dropped.chars:,} chars"
        text = Text(f"✗ reasoning of msg {dropped.message_index} ({size})", style="red dim")
        super().__init__(text, classes="dropped-row")
        self.dropped = dropped


class ContextPanel(VerticalScroll):
    """Side panel (toggled with ctrl+k). Call :meth:`show` with a :class:`ContextView`."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, classes="context-panel")
        self.view: ContextView | None = None
        self.border_title = "Next request"

    def compose(self) -> ComposeResult:
        yield Static("(nothing to send yet)", classes="context-empty")

    async def show(self, view: ContextView) -> None:
        """Replace the rows."""
        self.view = view
        total = format_tokens(view.total_tokens)
        self.border_title = f"Next request · {len(view.rows)} msgs · {total} tok"
        self.border_subtitle = "exact (tokenizer)" if view.exact else "estimated"
        widgets: list[Static] = [ContextRowView(r) for r in view.rows]
        if view.dropped:
            widgets.append(Static(Text("dropped (earlier turns):", style="bold"), classes="context-heading"))
            widgets += [DroppedView(d) for d in view.dropped]
        if not widgets:
            widgets = [Static("(nothing to send yet)", classes="context-empty")]
        await self.remove_children()
        await self.mount_all(widgets)

