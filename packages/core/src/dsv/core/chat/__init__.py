"""dsv.core.chat -- the DeepSeek-V3.2 chat encoding, its parser and the thinking-context rule.

Everything in dsv that formats a prompt or reads a completion goes through here::

    from dsv.core.chat import encode_messages, parse_assistant, StreamParser

    prompt = encode_messages([{"role": "user", "content": "hi"}], thinking=True)
    parsed = parse_assistant(generated_text, thinking=True)

Run the checks: ``pytest packages/core/tests/test_chat_*.py``.
"""

from dsv.core.chat.context import apply_thinking_context, last_user_index
from dsv.core.chat.encoding import (
    ChatFormatError,
    encode_assistant_completion,
    encode_messages,
    encode_tool_calls,
    forced_call_name,
    forced_call_opening,
    normalize_tool_calls,
    render_tools,
    tool_schemas,
)
from dsv.core.chat.parser import (
    ChatDelta,
    ParsedAssistant,
    StreamParser,
    ToolCall,
    collect,
    parse_assistant,
    partial_call,
)
from dsv.core.chat.templates import Templates

__all__ = [
    "ChatDelta",
    "ChatFormatError",
    "ParsedAssistant",
    "StreamParser",
    "Templates",
    "ToolCall",
    "apply_thinking_context",
    "collect",
    "encode_assistant_completion",
    "encode_messages",
    "encode_tool_calls",
    "forced_call_name",
    "forced_call_opening",
    "last_user_index",
    "normalize_tool_calls",
    "parse_assistant",
    "partial_call",
    "render_tools",
    "tool_schemas",
]
