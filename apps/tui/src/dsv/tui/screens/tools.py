"""/tools: every tool the model may call, where it comes from, and whether it asks first.

Enter on a tool toggles "always allow this tool for this session"; ``m`` cycles the approval
mode (ask, auto for read-only tools, auto for all). Changes apply to the next call.
"""

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

from dsv.tui.tools import APPROVAL_MODES


class ToolsScreen(ModalScreen[None]):
    """The tool list; esc closes."""

    CSS_PATH = "tools.tcss"
    BINDINGS = [
        Binding("escape,q", "close", "Close"),
        Binding("m", "cycle_mode", "Approval mode"),
    ]

    def __init__(self, registry: Any, policy: Any) -> None:
        super().__init__()
        self.registry = registry
        self.policy = policy

    def compose(self) -> ComposeResult:
        with Vertical(id="tools-dialog"):
            yield Label("", id="tools-title")
            yield OptionList(id="tools-list")
            yield Label("enter: always allow on/off · m: approval mode · esc: close", id="tools-keys")

    def on_mount(self) -> None:
        self._fill()

    def _label(self, name: str) -> Text:
        tool = self.registry.get(name)
        text = Text()
        text.append(f"{name:<16}", style="bold")
        text.append(f"{tool.source:<8}", style="dim")
        text.append("read-only " if tool.read_only else "writes    ", style="green" if tool.read_only else "yellow")
        if name in self.policy.always_allowed:
            text.append("always allowed  ", style="bold green")
        elif self.policy.needs_approval(tool):
            text.append("asks first      ", style="yellow")
        else:
            text.append("runs directly   ", style="green")
        text.append(" ".join(str(tool.description).split())[:70], style="dim")
        return text

    def _fill(self) -> None:
        names = self.registry.names()
        self.query_one("#tools-title", Label).update(
            f"{len(names)} tools · approval mode [b]{self.policy.mode}[/b]"
        )
        options = self.query_one(OptionList)
        highlighted = options.highlighted
        options.clear_options()
        options.add_options([Option(self._label(n), id=n) for n in names])
        if highlighted is not None and names:
            options.highlighted = min(highlighted, len(names) - 1)

    @on(OptionList.OptionSelected)
    def _toggle(self, event: OptionList.OptionSelected) -> None:
        name = str(event.option.id)
        allowed = self.policy.always_allowed
        if name in allowed:
            allowed.discard(name)
        else:
            allowed.add(name)
        self._fill()

    def action_cycle_mode(self) -> None:
        self.policy.mode = APPROVAL_MODES[(APPROVAL_MODES.index(self.policy.mode) + 1) % len(APPROVAL_MODES)]
        self._fill()

    def action_close(self) -> None:
        self.dismiss(None)
