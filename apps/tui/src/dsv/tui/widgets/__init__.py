"""The widgets of dsv chat, each named for what it shows."""

from dsv.tui.widgets.answer_block import AnswerBlock
from dsv.tui.widgets.command_hints import CommandHints, SlashCommand
from dsv.tui.widgets.context_panel import ContextPanel, ContextRowView, ContextView, DroppedView, context_view
from dsv.tui.widgets.error_notice import ErrorNotice, describe_error
from dsv.tui.widgets.format import format_seconds, format_tokens, usage_line
from dsv.tui.widgets.prompt_input import PromptInput
from dsv.tui.widgets.reasoning_block import ReasoningBlock
from dsv.tui.widgets.status_header import StatusHeader
from dsv.tui.widgets.tool_card import ToolCard
from dsv.tui.widgets.transcript import Transcript
from dsv.tui.widgets.user_message import UserMessage

__all__ = [
    "AnswerBlock",
    "CommandHints",
    "ContextPanel",
    "ContextRowView",
    "ContextView",
    "DroppedView",
    "ErrorNotice",
    "PromptInput",
    "ReasoningBlock",
    "SlashCommand",
    "StatusHeader",
    "ToolCard",
    "Transcript",
    "UserMessage",
    "context_view",
    "describe_error",
    "format_seconds",
    "format_tokens",
    "usage_line",
]
