"""The slash commands matching what is typed, shown under the prompt while it starts with ``/``."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.widgets import Static


@dataclass(frozen=True)
class SlashCommand:
    """A command the prompt accepts: ``/name args``; ``key`` is its binding, when it has one."""

    name: str
    args: str
    help: str
    key: str = ""


class CommandHints(Static):
    """Lists the commands whose name starts with the typed word; hidden otherwise."""

    def __init__(self, commands: list[SlashCommand], *, id: str | None = None) -> None:
        super().__init__("", id=id, classes="command-hints")
        self.commands = commands
        self.matches: list[SlashCommand] = []

    def on_mount(self) -> None:
        self.display = False

    def filter(self, typed: str) -> None:
        """Show the commands ``typed`` (the prompt's text) could be."""
        word = typed.split(" ", 1)[0]
        if not word.startswith("/") or " " in typed:
            self.matches = []
        else:
            self.matches = [c for c in self.commands if ("/" + c.name).startswith(word)]
        self.display = bool(self.matches)
        text = Text()
        for c in self.matches:
            text.append(f"/{c.name}", style="bold")
            if c.args:
                text.append(f" {c.args}", style="italic")
            text.append(f"  {c.help}", style="dim")
            if c.key:
                text.append(f"  ({c.key})", style="dim")
            text.append("\n")
        text.rstrip()
        self.update(text)
