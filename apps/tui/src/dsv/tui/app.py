"""``ChatApp``: the Textual application of ``dsv chat``.

Built by one constructor that the CLI and the tests share: ``ChatApp(agent=..., store=...)``. The
app holds the agent (client, tools, approval policy, current session) and the session store; the
screens draw them. Everything runs on Textual's event loop: turns are workers, tools that block
run in threads inside the agent.

    app = ChatApp(agent=agent, store=SessionStore())
    app.run()

Tests drive it with ``app.run_test()`` (Pilot). ``format_seconds`` is injectable so snapshots of
screens that show durations stay byte-stable.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from dsv.tui.screens.chat import ChatScreen
from dsv.tui.widgets.format import SecondsFormat, format_seconds


class ChatApp(App[None]):
    """The agent shell. ``agent`` is a :class:`dsv.tui.agent.Agent`; ``store`` a ``SessionStore``."""

    TITLE = "dsv chat"
    CSS_PATH = "app.tcss"
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", priority=True)]
    # a mode, not get_default_screen(): Textual loads a screen's CSS_PATH only for modes and pushes
    MODES = {"chat": ChatScreen}
    DEFAULT_MODE = "chat"

    def __init__(
        self,
        *,
        agent: Any,
        store: Any,
        format_seconds: SecondsFormat = format_seconds,
        show_context: bool = False,
        export_dir: Path | None = None,
    ) -> None:
        """``export_dir`` is where /export writes without a path (default: the agent's workspace)."""
        super().__init__()
        self.agent = agent
        self.store = store
        self.format_seconds = format_seconds
        self.show_context = show_context
        workspace = getattr(getattr(agent, "tools", None), "workspace", None)
        self.export_dir = Path(export_dir or workspace or Path.cwd())

    @property
    def chat(self) -> ChatScreen:
        """The main screen (also while a dialog is on top of it)."""
        screen = self.screen_stack[0] if isinstance(self.screen_stack[0], ChatScreen) else None
        assert screen is not None, "the chat screen is the default screen"
        return screen

    def session_label(self, session: Any) -> str:
        """``title · 2026-12-07 14:02`` for the header and notifications."""
        created = str(session.created).replace("T", " ")[:16]
        return f"{session.title or 'new session'} · {created}"

    async def set_client(self, *, base_url: str | None = None, model: str | None = None) -> None:
        """Point the agent at another endpoint and/or model (the session records both)."""
        from dsv.tui.client import ChatClient

        old = self.agent.client
        base_url = base_url or old.base_url
        model = model or old.model
        self.agent.client = ChatClient(base_url, old.api_key, model, max_tokens=old.max_tokens,
                                       temperature=old.temperature, read_timeout_s=old.read_timeout_s)  # fmt: skip
        await old.aclose()
        session = self.agent.session
        session.endpoint, session.model = base_url, model
        if session.messages:
            session.save()

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        chat = self.screen_stack[0]
        if not isinstance(chat, ChatScreen):
            return
        yield SystemCommand("Thinking on/off", "Toggle thinking mode (/think)", chat.action_toggle_thinking)
        yield SystemCommand("Context panel", "Show or hide what the next request sends", chat.action_toggle_context)
        yield SystemCommand("New session", "Start a new session (/new)", chat.action_new_session)
        yield SystemCommand("Resume session", "Pick a saved session (/resume)", chat.action_resume)
        yield SystemCommand("Fork", "Branch a new session before an earlier message (/fork)", chat.action_fork)
        yield SystemCommand("Save session", "Save now (/save)", chat.action_save)
        yield SystemCommand("Export Markdown", "Write the session as Markdown (/export)", chat.action_export)
        yield SystemCommand("Tools", "Tools, approvals and the approval mode (/tools)", chat.action_tools)
        yield SystemCommand("Retry", "Retry the failed turn", chat.action_retry)
        yield SystemCommand("Help", "Slash commands and keys (/help)", chat.action_help)
