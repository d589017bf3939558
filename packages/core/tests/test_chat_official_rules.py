"""Rules of the official V3.2 encoder and parser (``encoding_dsv32.py``) that dsv matches: the
thinking-mode refusal of an assistant turn without reasoning or tool calls, a developer message
dropped from the history in thinking mode, and ``reasoning_content == ""`` from a chat-mode parse.

Run: ``pytest packages/core/tests/test_chat_official_rules.py``.
"""

from __future__ import annotations

import pytest

from dsv.core.chat import ChatFormatError, encode_messages, parse_assistant

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"
CALL = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def test_thinking_mode_refuses_an_answer_without_reasoning_after_the_last_user() -> None:
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(ChatFormatError, match=r"^missing reasoning_content in the assistant message at message index 1:"):
        encode_messages(msgs, thinking=True)
    # the index is the caller's, whatever the encoder added (a system message for tools) or dropped
    # (a developer message before the last user message)
    longer = [{"role": "developer", "content": "d"}, {"role": "assistant", "content": "x"},
              {"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
              {"role": "tool", "content": "r"}, {"role": "assistant", "content": "done"}]  # fmt: skip
    with pytest.raises(ChatFormatError, match=r"message index 5:"):
        encode_messages(longer, thinking=True, tools=[TOOL])
    # reasoning or tool calls make it valid; chat mode and turns before the last user never need them
    assert encode_messages([msgs[0], {**msgs[1], "reasoning_content": "r"}], thinking=True).endswith(
        f"{A}<think>r</think>a{EOS}"
    )
    assert encode_messages(msgs, thinking=False).endswith(f"{A}</think>a{EOS}")
    # an explicit empty reasoning is a generation that closed its think at once: it renders as generated
    empty = parse_assistant("</think>a" + EOS, thinking=True).to_message()
    assert empty["reasoning_content"] == ""
    assert encode_messages([msgs[0], empty], thinking=True).endswith(f"{A}<think></think>a{EOS}")
    assert encode_messages([*msgs, {"role": "user", "content": "q2"}], thinking=True).endswith(
        f"{U}q{A}</think>a{EOS}{U}q2{A}<think>"
    )


def test_developer_message_before_the_last_user_is_dropped_in_thinking_mode() -> None:
    msgs = [{"role": "developer", "content": "be brief"}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "q"}]  # fmt: skip
    dev = f"{U}\n\n# The user's message is: be brief{A}</think>"
    # the official encoder's output (drop_thinking_messages keeps user/system/tool turns only)
    assert encode_messages(msgs, thinking=True) == f"{BOS}ok{EOS}{U}q{A}<think>"
    assert encode_messages(msgs, thinking=True, drop_thinking=False) == f"{BOS}{dev}ok{EOS}{U}q{A}<think>"
    assert encode_messages(msgs, thinking=False) == f"{BOS}{dev}ok{EOS}{U}q{A}</think>"
    # the last user/developer message itself stays
    last = f"{U}\n\n# The user's message is: be brief{A}<think>"
    assert encode_messages(msgs[:1], thinking=True) == f"{BOS}{last}"


def test_chat_mode_parse_gives_empty_reasoning() -> None:
    parsed = parse_assistant("Hello." + EOS, thinking=False)
    assert parsed.reasoning_content == "" and parsed.content == "Hello." and parsed.finished
    assert parsed.to_message() == {"role": "assistant", "content": "Hello.", "reasoning_content": ""}
    assert parse_assistant("r</think>a" + EOS, thinking=True).reasoning_content == "r"
