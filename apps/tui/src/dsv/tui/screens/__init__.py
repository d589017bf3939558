"""The screens of dsv chat: each a ``.py`` with its ``.tcss`` beside it."""

from dsv.tui.screens.approval import ApprovalScreen
from dsv.tui.screens.chat import SLASH_COMMANDS, ChatScreen
from dsv.tui.screens.fork_picker import ForkPickerScreen
from dsv.tui.screens.help import HelpScreen
from dsv.tui.screens.session_picker import SessionPickerScreen
from dsv.tui.screens.tools import ToolsScreen

__all__ = [
    "SLASH_COMMANDS",
    "ApprovalScreen",
    "ChatScreen",
    "ForkPickerScreen",
    "HelpScreen",
    "SessionPickerScreen",
    "ToolsScreen",
]
