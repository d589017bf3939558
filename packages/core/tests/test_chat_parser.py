"""Parser tests: round trips through the encoder, hypothesis fuzzing, streaming == one-shot.

Run: ``pytest packages/core/tests/test_chat_parser.py``.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from dsv.core.chat import (
    StreamParser,
    Templates,
    ToolCall,
    collect,
    encode_assistant_completion,
    encode_messages,
    parse_assistant,
    partial_call,
)

EOS = "<｜end▁of▁sentence｜>"
SPECIALS = ["<｜begin▁of▁sentence｜>", EOS, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
DSML_PIECES = [
    "\n\n<｜DSML｜function_calls>",
    "<｜DSML｜function_calls>\n",
    '<｜DSML｜invoke name="f">\n',
    '<｜DSML｜invoke name="',
    "</｜DSML｜invoke>",
    '<｜DSML｜parameter name="x" string="true">',
    '<｜DSML｜parameter name="y" string="false">',
    "</｜DSML｜parameter>",
    "</｜DSML｜function_calls>",
    "｜DSML｜",
    "\n",
]

# Text that cannot contain a tag: the round-trip domain.
plain = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="<｜"), max_size=40)
json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=False, allow_infinity=False)
)
json_value = st.recursive(
    json_scalar | plain,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(plain, inner, max_size=3),
    max_leaves=6,
)
names = st.from_regex(r"[a-z_][a-z0-9_]{0,12}", fullmatch=True)
tool_call = st.builds(
    lambda n, a: {
        "type": "function",
        "function": {"name": n, "arguments": json.dumps(a, ensure_ascii=False)},
    },
    names,
    st.dictionaries(names, json_value, max_size=4),
)
assistant = st.fixed_dictionaries(
    {"content": plain, "reasoning_content": plain, "tool_calls": st.lists(tool_call, max_size=3)}
)
garbage = st.lists(st.one_of(st.sampled_from(SPECIALS + DSML_PIECES), st.text(max_size=8)), max_size=30).map(
    "".join
)


def _same_message(parsed: dict, msg: dict, thinking: bool) -> None:
    assert parsed["content"] == msg["content"]
    # chat mode parses to "" like the official parser (parse_message_from_completion_text)
    assert parsed["reasoning_content"] == (msg["reasoning_content"] if thinking else "")
    got = parsed.get("tool_calls", [])
    assert [c["function"]["name"] for c in got] == [c["function"]["name"] for c in msg["tool_calls"]]
    for g, m in zip(got, msg["tool_calls"], strict=True):
        assert json.loads(g["function"]["arguments"]) == json.loads(m["function"]["arguments"])


@settings(max_examples=200, deadline=None)
@given(msg=assistant, thinking=st.booleans())
def test_round_trip(msg: dict, thinking: bool) -> None:
    text = encode_assistant_completion(msg, thinking=thinking)
    parsed = parse_assistant(text, thinking=thinking)
    assert parsed.finished
    _same_message(parsed.to_message(), msg, thinking)


@settings(max_examples=100, deadline=None)
@given(msg=assistant, thinking=st.booleans())
def test_round_trip_through_full_prompt(msg: dict, thinking: bool) -> None:
    """The generated part is exactly what encode_messages appends for the turn."""
    history = [{"role": "user", "content": "q"}]
    prompt = encode_messages(history, thinking=thinking)
    full = encode_messages([*history, {"role": "assistant", **msg}], thinking=thinking)
    assert full.startswith(prompt)
    _same_message(parse_assistant(full[len(prompt) :], thinking=thinking).to_message(), msg, thinking)


def test_examples() -> None:
    p = parse_assistant("think hard</think>The answer is 2." + EOS, thinking=True)
    assert (p.reasoning_content, p.content, p.tool_calls, p.finished) == (
        "think hard",
        "The answer is 2.",
        [],
        True,
    )
    p = parse_assistant("Hi<｜User｜> there", thinking=False)  # special token inside content is dropped
    assert (p.content, p.reasoning_content, p.finished) == ("Hi there", "", False)
    p = parse_assistant(
        'ok\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n'
        '<｜DSML｜parameter name="n" string="false">not json</｜DSML｜parameter>\n</｜DSML｜invoke>\n'
        '<｜DSML｜invoke name="g">\n<｜DSML｜parameter name="s" string="true">unterminated',
        thinking=False,
        id_prefix="abc",
    )
    assert p.content == "ok" and not p.finished
    assert p.tool_calls == [ToolCall(id="abc_0", name="f", arguments='{"n": "not json"}')]


def test_truncated_think_is_all_reasoning() -> None:
    p = parse_assistant("still thinking </thi", thinking=True)
    assert p.reasoning_content == "still thinking </thi" and p.content == "" and not p.finished


@settings(max_examples=500, deadline=None)
@given(text=garbage, thinking=st.booleans())
def test_garbage_never_raises(text: str, thinking: bool) -> None:
    p = parse_assistant(text, thinking=thinking)
    for call in p.tool_calls:
        assert isinstance(json.loads(call.arguments), dict)
    for special in SPECIALS:
        assert special not in p.content
        assert special not in (p.reasoning_content or "")


@settings(max_examples=300, deadline=None)
@given(
    text=st.one_of(garbage, assistant.map(lambda m: encode_assistant_completion(m, thinking=True))),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    thinking=st.booleans(),
)
def test_streaming_any_split_matches_one_shot(text: str, cuts: list[int], thinking: bool) -> None:
    points = sorted({c % (len(text) + 1) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    parser = StreamParser(thinking)
    deltas = [d for piece in pieces for d in parser.feed(piece)] + parser.finish()
    assert collect(deltas, thinking=thinking, finished=parser.finished) == parse_assistant(
        text, thinking=thinking
    )


def test_streaming_emits_early_and_holds_back_tag_prefixes() -> None:
    parser = StreamParser(thinking=True)
    assert [d.text for d in parser.feed("abc</th")] == ["abc"]
    assert parser.feed("ink>x") == [parser_delta("content", "x")]
    calls = parser.feed('\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n')
    assert calls == []
    (call,) = parser.feed("</｜DSML｜invoke>\n</｜DSML｜function_calls>")
    assert (call.kind, call.name, call.arguments, call.index) == ("tool_call", "f", "{}", 0)
    assert parser.feed(EOS + "ignored") == [] and parser.finished


def parser_delta(kind: str, text: str):
    from dsv.core.chat import ChatDelta

    return ChatDelta(kind=kind, text=text)  # type: ignore[arg-type]


def test_partial_call_keeps_complete_parameters_and_the_string_being_written() -> None:
    t = Templates()
    d = t.dsml_token
    head = f'{t.tool_calls_start}>\n<{d}invoke name="f">\n'
    text = (head + f'<{d}parameter name="n" string="false">3</{d}parameter>\n'
            f'<{d}parameter name="q" string="true">hello wor</{d}para')  # fmt: skip
    cut = partial_call(text, t, index=1, id_prefix="call_a")
    assert cut is not None and (cut.name, json.loads(cut.arguments), cut.id) == ("f", {"n": 3, "q": "hello wor"},
                                                                                "call_a_1")
    assert json.loads(partial_call(head + f'<{d}parameter name="n" string="false">[1, ', t, index=0,
                                   id_prefix="c").arguments) == {}  # type: ignore[union-attr]
    assert partial_call(f'{t.tool_calls_start}>\n<{d}invoke na', t, index=0, id_prefix="c") is None
    assert partial_call("plain text", t, index=0, id_prefix="c") is None
