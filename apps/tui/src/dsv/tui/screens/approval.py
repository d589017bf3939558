"""The approval dialog for a tool that writes or runs something: allow once, always, deny, edit.

Shows what will happen (the diff of a write/edit, the command line of a shell call) and the
arguments. "Edit" makes the arguments editable; they must stay a JSON object, and the call runs
with the edited ones. The result is the ``Approval`` the agent's ``approve`` callback returns.
"""

from __future__ import annotations

import json
from typing import Any

from rich.syntax import Syntax
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static, TextArea

from dsv.tui.tools import EditedArguments


def preview_renderable(preview: str) -> Syntax:
    """A diff (``---``/``+++``/``@@`` lines) highlighted as one, anything else as a shell line."""
    lexer = "diff" if preview.lstrip().startswith(("---", "@@", "diff ")) else "bash"
    return Syntax(preview or "(nothing to preview)", lexer, theme="ansi_dark", word_wrap=True)


class ApprovalScreen(ModalScreen[Any]):
    """Dismisses with ``"once"``, ``"always"``, ``"deny"`` or :class:`EditedArguments`."""

    CSS_PATH = "approval.tcss"
    BINDINGS = [
        Binding("y", "once", "Allow once"),
        Binding("a", "always", "Always allow"),
        Binding("n,escape", "deny", "Deny"),
        Binding("e", "edit", "Edit arguments"),
    ]

    def __init__(self, *, name: str, arguments: dict[str, Any], preview: str) -> None:
        super().__init__()
        self.tool_name = name
        self.arguments = arguments
        self.preview = preview
        self.editing = False

    def compose(self) -> ComposeResult:
        with Vertical(id="approval-dialog"):
            yield Label(Text.assemble("Allow ", (self.tool_name, "bold"), " to run?"), id="approval-title")
            with VerticalScroll(id="approval-preview"):
                yield Static(preview_renderable(self.preview))
            yield TextArea(
                json.dumps(self.arguments, indent=2, ensure_ascii=False),
                language="json",
                read_only=True,
                id="approval-arguments",
            )
            yield Label("", id="approval-error")
            with Horizontal(id="approval-buttons"):
                yield Button("Allow once (y)", id="once", variant="primary")
                yield Button(f"Always allow {self.tool_name} (a)", id="always")
                yield Button("Deny (n)", id="deny", variant="error")
                yield Button("Edit arguments (e)", id="edit")

    def on_mount(self) -> None:
        self.query_one("#once", Button).focus()

    @on(Button.Pressed)
    async def _pressed(self, event: Button.Pressed) -> None:
        await self.run_action(str(event.button.id))

    def action_once(self) -> None:
        if self.editing:
            self._run_edited()
        else:
            self.dismiss("once")

    def action_always(self) -> None:
        if not self.editing:
            self.dismiss("always")

    def action_deny(self) -> None:
        self.dismiss("deny")

    def action_edit(self) -> None:
        if self.editing:
            return
        self.editing = True
        area = self.query_one("#approval-arguments", TextArea)
        area.read_only = False
        area.add_class("-editing")
        self.query_one("#once", Button).label = "Run with these arguments (ctrl+s)"
        self.query_one("#always", Button).disabled = True
        self.query_one("#edit", Button).disabled = True
        area.focus()

    def key_ctrl_s(self) -> None:
        if self.editing:
            self._run_edited()

    def _run_edited(self) -> None:
        text = self.query_one("#approval-arguments", TextArea).text
        try:
            arguments = json.loads(text)
        except json.JSONDecodeError as exc:
            self.query_one("#approval-error", Label).update(f"not JSON: {exc.msg} (line {exc.lineno}); fix it or deny")
            return
        if not isinstance(arguments, dict):
            self.query_one("#approval-error", Label).update("the arguments must be a JSON object ({...})")
            return
        self.dismiss(EditedArguments(arguments))
