"""/help and F1: the slash commands, the keys, and the thinking-with-tools rule in two lines."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from dsv.tui.widgets import SlashCommand

RULE = (
    "Reasoning is sent back while the model calls tools within one of your messages, and dropped "
    "once you send the next message; tool calls and results always stay. The context panel "
    "(ctrl+k) shows exactly what the next request sends."
)


def help_table(commands: list[SlashCommand], keys: list[tuple[str, str]]) -> Table:
    table = Table(box=None, show_header=False, padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column()
    table.add_column(style="dim")
    for c in commands:
        table.add_row(f"/{c.name} {c.args}".rstrip(), c.help, c.key)
    table.add_row("", "", "")
    for key, description in keys:
        table.add_row(key, description, "")
    return table


class HelpScreen(ModalScreen[None]):
    """Any of esc, q, F1 closes it."""

    CSS_PATH = "help.tcss"
    BINDINGS = [Binding("escape,q,f1", "close", "Close")]

    def __init__(self, commands: list[SlashCommand], keys: list[tuple[str, str]]) -> None:
        super().__init__()
        self.commands = commands
        self.keys = keys

    def compose(self) -> ComposeResult:
        with Vertical(id="help-dialog"):
            yield Label("dsv chat · help  (esc to close)", id="help-title")
            with VerticalScroll(id="help-body"):
                yield Static(help_table(self.commands, self.keys))
                yield Static(Text(RULE, style="italic"), id="help-rule")

    def action_close(self) -> None:
        self.dismiss(None)
