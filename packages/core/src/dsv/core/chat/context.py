"""The thinking-with-tools context rule (spec §6.3).

Reasoning is kept across tool calls inside one user turn and dropped from history once a new
user (or developer) message arrives; tool calls and tool results always stay.

Run the checks: ``pytest packages/core/tests/test_chat_encoding.py -k context``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["apply_thinking_context", "last_user_index"]


def last_user_index(messages: Sequence[Mapping[str, Any]]) -> int:
    """Index of the last user/developer message, -1 when there is none."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") in ("user", "developer"):
            return i
    return -1


def apply_thinking_context(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``messages`` with ``reasoning_content`` removed from assistant turns that come
    before the last user/developer message. Later assistant turns (the current tool loop), tool
    calls and tool results are kept unchanged."""
    last = last_user_index(messages)
    out = []
    for i, m in enumerate(messages):
        m = dict(m)
        if m.get("role") == "assistant" and i < last:
            m.pop("reasoning_content", None)
        out.append(m)
    return out
