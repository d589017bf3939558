"""Golden tests of the V3.2 chat encoding against prompt strings written by hand from the spec (§6).

Run: ``pytest packages/core/tests/test_chat_encoding.py``.
"""

from __future__ import annotations

import json

import pytest

from dsv.core.chat import (
    ChatFormatError,
    Templates,
    apply_thinking_context,
    encode_messages,
    encode_tool_calls,
    forced_call_name,
    forced_call_opening,
    render_tools,
)

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_spec_example_multi_turn_thinking() -> None:
    messages = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hello! I am DeepSeek.", "reasoning_content": "greet back"},
        {"role": "user", "content": "1+1=?"},
    ]
    expected = (
        "<｜begin▁of▁sentence｜><｜User｜>hello<｜Assistant｜></think>Hello! I am DeepSeek."
        "<｜end▁of▁sentence｜><｜User｜>1+1=?<｜Assistant｜><think>"
    )
    assert encode_messages(messages, thinking=True) == expected


def test_chat_mode_every_user_turn_ends_with_think_end() -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hey"},
        {"role": "user", "content": "bye"},
    ]
    assert encode_messages(messages, thinking=False) == (
        f"{BOS}Be brief.{U}hi{A}</think>hey{EOS}{U}bye{A}</think>"
    )


def test_no_bos_and_content_parts() -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert encode_messages(messages, thinking=True, add_bos=False) == f"{U}ab{A}<think>"


def test_tool_loop_thinking_keeps_current_reasoning() -> None:
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    call2 = {
        "id": "c2",
        "type": "function",
        "function": {"name": "add", "arguments": '{"a": 1, "b": [2, "x"]}'},
    }
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "reasoning_content": "need tools", "tool_calls": [call, call2]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "3"},
    ]
    expected = (
        f"{BOS}{U}weather?{A}<think>need tools</think>\n\n<｜DSML｜function_calls>\n"
        '<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        '<｜DSML｜invoke name="add">\n'
        '<｜DSML｜parameter name="a" string="false">1</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="b" string="false">[2, "x"]</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        f"</｜DSML｜function_calls>{EOS}"
        "\n\n<function_results>\n<result>sunny</result>\n<result>3</result>\n</function_results>\n\n<think>"
    )
    assert encode_messages(messages, thinking=True) == expected
    # chat mode: no reasoning, and results end with </think>
    chat = encode_messages(messages, thinking=False)
    assert "need tools" not in chat
    assert chat.endswith("</function_results>\n\n</think>")
    assert chat.startswith(f"{BOS}{U}weather?{A}</think>\n\n<｜DSML｜function_calls>")


def test_reasoning_dropped_when_new_user_message_arrives() -> None:
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
    }
    messages = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "", "reasoning_content": "R1", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "rain"},
        {"role": "assistant", "content": "It rains.", "reasoning_content": "R2"},
        {"role": "user", "content": "q2"},
    ]
    prompt = encode_messages(messages, thinking=True)
    assert "R1" not in prompt and "R2" not in prompt
    # tool calls and results stay
    assert '<｜DSML｜parameter name="city" string="true">Rome</｜DSML｜parameter>' in prompt
    assert "\n<result>rain</result>\n</function_results>\n\n</think>It rains." + EOS in prompt
    assert prompt.endswith(f"{U}q2{A}<think>")
    # within the loop (no new user message yet) both reasonings are kept
    in_loop = encode_messages(messages[:4], thinking=True)
    assert "<think>R1</think>" in in_loop and "<think>R2</think>It rains." in in_loop


def test_apply_thinking_context() -> None:
    messages = [
        {"role": "user", "content": "a"},
        {
            "role": "assistant",
            "content": "b",
            "reasoning_content": "old",
            "tool_calls": [{"function": {"name": "f"}}],
        },
        {"role": "tool", "content": "r"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d", "reasoning_content": "new"},
    ]
    out = apply_thinking_context(messages)
    assert "reasoning_content" not in out[1] and out[1]["tool_calls"] == messages[1]["tool_calls"]
    assert out[4]["reasoning_content"] == "new"
    assert messages[1]["reasoning_content"] == "old", "input must not be mutated"


def test_drop_thinking_false_keeps_only_current_turn_reasoning_in_prompt() -> None:
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "reasoning_content": "old"},
        {"role": "user", "content": "c"},
    ]
    # Reasoning appears only after the last user message, whatever drop_thinking says.
    assert "old" not in encode_messages(messages, thinking=True, drop_thinking=False)


def test_tools_and_response_format_in_system() -> None:
    prompt = encode_messages(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}],
        thinking=True,
        tools=[WEATHER],
        response_format={"type": "object"},
    )
    t = Templates()
    tools = render_tools([WEATHER], t)
    fmt = t.response_format_template.format(schema='{"type": "object"}')
    assert prompt == f"{BOS}S\n\n{tools}\n\n{fmt}{U}u{A}<think>"
    assert json.dumps(WEATHER["function"], ensure_ascii=False) in tools
    assert "<functions>\n" + json.dumps(WEATHER["function"], ensure_ascii=False) + "\n</functions>" in tools
    assert "<｜DSML｜function_calls>" in tools and "<think>" in tools and "</think>" in tools


def test_tools_without_system_message_get_an_empty_system() -> None:
    prompt = encode_messages([{"role": "user", "content": "u"}], thinking=False, tools=[WEATHER])
    assert prompt == f"{BOS}\n\n{render_tools([WEATHER])}{U}u{A}</think>"


def test_developer_message() -> None:
    dev = {"role": "developer", "content": "do it", "tools": [WEATHER]}
    prompt = encode_messages([dev], thinking=True)
    assert prompt == f"{BOS}{U}\n\n{render_tools([WEATHER])}\n\n# The user's message is: do it{A}<think>"


def test_errors() -> None:
    with pytest.raises(ChatFormatError, match="role"):
        encode_messages([{"role": "robot", "content": "x"}])
    with pytest.raises(ChatFormatError, match="tool result"):
        encode_messages([{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}])
    bad = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}],
    }
    with pytest.raises(ChatFormatError, match="not JSON"):
        encode_messages([{"role": "user", "content": "x"}, bad])
    with pytest.raises(ChatFormatError, match="tool"):
        encode_messages([{"role": "user", "content": "x"}], tools=[{"type": "function", "function": {}}])


TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "mul"}}]  # fmt: skip


@pytest.mark.parametrize(
    ("tools", "choice", "expected"),
    [
        (TOOLS, None, None),
        (TOOLS, "auto", None),
        (TOOLS, "none", None),
        (TOOLS, "required", ""),  # a call, the model picks the function
        (TOOLS[:1], "required", "add"),  # a single tool: the call is that one
        (TOOLS, {"type": "function", "function": {"name": "mul"}}, "mul"),
    ],
)
def test_forced_call_name(tools: list[dict], choice: object, expected: str | None) -> None:
    assert forced_call_name(tools, choice) == expected


@pytest.mark.parametrize(
    ("tools", "choice", "message"),
    [
        ([], "required", "no tools"),
        (TOOLS, {"type": "function", "function": {"name": "div"}}, "`div`, which is not in tools"),
        (TOOLS, {"type": "function"}, "tool_choice must be"),
        (TOOLS, "sometimes", "tool_choice must be"),
    ],
)
def test_forced_call_name_refuses(tools: list[dict], choice: object, message: str) -> None:
    with pytest.raises(ChatFormatError, match=message):
        forced_call_name(tools, choice)


def test_forced_call_opening_is_the_start_of_the_encoded_call() -> None:
    # what a server appends to the prompt must be the exact prefix of the call the encoder renders
    # for the finished turn, or the prompt's tokens and a replayed conversation's would differ
    call = encode_tool_calls([{"name": "add", "arguments": {"a": 1, "b": "x"}}])
    named, unnamed = forced_call_opening("add"), forced_call_opening()
    assert call.startswith(named) and named.startswith(unnamed)
    assert unnamed.endswith('invoke name="') and named == unnamed + 'add">\n'
    custom = Templates(dsml_token="|T|")
    assert forced_call_opening("add", custom) == '\n\n<|T|function_calls>\n<|T|invoke name="add">\n'
