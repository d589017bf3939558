"""Forced tool calls through a real ``dsv serve`` with random weights: always a complete call.

- A property test over generated tool schemas (required and optional parameters, bounded integers,
  numbers with a step, strings with lengths, enums, booleans, nested objects and arrays): with
  ``tool_choice`` ``"required"`` or a named function, every choice of a random-weight tiny model
  (``n`` choices, one seed each) returns ``tool_calls`` whose arguments parse as JSON and validate
  against the tool's schema, through the official ``openai`` client; streaming gives the same calls
  for the same seed. Strings have a ``maxLength``: without one, a random model's raw string text
  need not end before the token limit (then the next test's rule applies).
- A call the token limit cuts comes back with what was written and ``finish_reason: "length"``.
- Thinking mode: reasoning first, then the constrained call.
- Content parts the model cannot take (images, audio, files) are a 400 naming the message and part.

Run: ``pytest packages/serve/tests/test_serve_tool_calls.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsv.core.chat import Templates
from dsv.serve.grammar import check_grammar, lark_grammar
from dsv.serve.tool_grammar import tool_call_grammar

_names = st.sampled_from(["city", "n", "items", "ok", "kind", "x_1", "days"])
_leaf = st.one_of(
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-50, 50), st.integers(0, 100)),
    st.builds(lambda lo, span: {"type": "number", "minimum": lo, "maximum": lo + span, "multipleOf": 0.5},
              st.integers(-5, 5), st.integers(1, 10)),
    st.builds(lambda lo, extra: {"type": "string", "minLength": lo, "maxLength": lo + extra},
              st.integers(0, 3), st.integers(0, 6)),
    st.just({"type": "boolean"}),
    st.lists(st.text("abcxyz _-", min_size=1, max_size=6), min_size=1, max_size=4, unique=True).map(
        lambda vs: {"type": "string", "enum": vs}
    ),
)  # fmt: skip
_value = st.recursive(
    _leaf,
    lambda inner: st.builds(
        lambda props: {"type": "object", "properties": props, "required": list(props)[:1],
                       "additionalProperties": False},
        st.dictionaries(_names, inner, min_size=1, max_size=2),
    ) | st.builds(lambda items, n: {"type": "array", "items": items, "minItems": 0, "maxItems": n},
                  inner, st.integers(0, 2)),
    max_leaves=4,
)  # fmt: skip
_parameters = st.builds(
    lambda props, mask: {"type": "object", "properties": props,
                         "required": [k for k, r in zip(props, mask, strict=False) if r]},
    st.dictionaries(_names, _value, min_size=0, max_size=3), st.lists(st.booleans(), max_size=3),
)  # fmt: skip


def _tool(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, live_server: Any) -> Iterator[Any]:
    from dsv.serve import load_native_app

    app = load_native_app(str(tiny_ckpt), model_name="dsv-tiny", max_model_len=4096, engine_process=False,
                          num_blocks=512, block_size=16)  # fmt: skip
    with live_server(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


ASK = [{"role": "user", "content": "What is the weather?"}]


def _calls(message: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def _streamed(client: openai.OpenAI, **kw: Any) -> dict[int, tuple[list[tuple[str, dict[str, Any]]], str | None]]:
    """Per choice: the calls the stream's tool-call deltas add up to, and the finish reason."""
    calls: dict[int, dict[int, dict[str, str]]] = {}
    finish: dict[int, str | None] = {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            for d in ch.delta.tool_calls or []:
                slot = calls.setdefault(ch.index, {}).setdefault(d.index, {"name": "", "arguments": ""})
                slot["name"] += (d.function.name or "") if d.function else ""
                slot["arguments"] += (d.function.arguments or "") if d.function else ""
            if ch.finish_reason is not None:
                finish[ch.index] = ch.finish_reason
    return {
        i: ([(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.get(i, {}).items())], finish.get(i))
        for i in finish
    }


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(first=_parameters, second=_parameters, named=st.booleans(), seed=st.integers(0, 2**31))
def test_every_forced_call_parses_and_validates(
    client: openai.OpenAI, first: dict[str, Any], second: dict[str, Any], named: bool, seed: int
) -> None:
    tools = [_tool("get_weather", first), _tool("lookup", second)]
    choice: Any = {"type": "function", "function": {"name": "lookup"}} if named else "required"
    kw: dict[str, Any] = {"model": "dsv-tiny", "messages": ASK, "tools": tools, "tool_choice": choice,
                          "temperature": 1.0, "seed": seed, "n": 4, "max_tokens": 600}  # fmt: skip
    out = client.chat.completions.create(**kw)
    schemas = {"get_weather": first, "lookup": second}
    full = {}
    for ch in out.choices:
        assert ch.finish_reason == "tool_calls", (tools, ch.message)
        calls = _calls(ch.message)
        assert calls, ch.message
        for name, args in calls:
            assert name == "lookup" if named else name in schemas
            jsonschema.validate(args, schemas[name])
        full[ch.index] = (calls, ch.finish_reason)
    assert _streamed(client, **kw) == full


def test_a_call_the_limit_cuts_is_returned_with_finish_length(client: openai.OpenAI) -> None:
    # An unbounded string: a random model's raw text does not reach the closing tag in 150 tokens.
    tool = _tool("search", {"type": "object", "properties": {"k": {"type": "integer", "minimum": 0, "maximum": 9},
                                                              "query": {"type": "string"}},
                            "required": ["k", "query"]})  # fmt: skip
    kw: dict[str, Any] = {"model": "dsv-tiny", "messages": ASK, "tools": [tool], "tool_choice": "required",
                          "temperature": 1.0, "seed": 3, "n": 3, "max_tokens": 150}  # fmt: skip
    out = client.chat.completions.create(**kw)
    full = {}
    for ch in out.choices:
        assert ch.finish_reason == "length"
        ((name, args),) = _calls(ch.message)
        assert name == "search" and set(args) <= {"k", "query"} and isinstance(args.get("k", 0), int)
        assert isinstance(args["query"], str), "the string being written is kept"
        assert ch.message.content == ""
        full[ch.index] = (_calls(ch.message), "length")
    assert _streamed(client, **kw) == full


def test_thinking_reasons_first_then_the_constrained_call(client: openai.OpenAI, tiny_ckpt: Path) -> None:
    from dsv.core.tokenizer import Tokenizer

    # A random model rarely writes `</think>`: a bias ends its reasoning after a few tokens.
    (end,) = Tokenizer.load(tiny_ckpt).encode("</think>", add_bos=False)
    schema = {"type": "object", "properties": {"unit": {"type": "string", "enum": ["c", "f"]},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 3}},
              "required": ["unit", "days"]}  # fmt: skip
    out = client.chat.completions.create(
        model="dsv-tiny-reasoner", messages=ASK, tools=[_tool("get_weather", schema)], tool_choice="required",
        temperature=1.0, seed=5, n=3, max_tokens=400, logit_bias={str(end): 6},
    )  # fmt: skip
    for ch in out.choices:
        assert ch.finish_reason == "tool_calls", ch.message
        ((name, args),) = _calls(ch.message)
        assert name == "get_weather"
        jsonschema.validate(args, schema)
        assert ch.message.content == ""
    assert out.usage is not None and out.usage.completion_tokens_details is not None
    assert out.usage.completion_tokens_details.reasoning_tokens >= 3  # at least each `</think>`


def test_the_grammar_takes_what_the_encoder_writes(tiny_ckpt: Path) -> None:
    # Calls the V3.2 encoding writes for this tool (strings with markup and quotes, JSON values,
    # an optional parameter left out, a nullable one) are inside the grammar, token by token.
    from dsv.core.chat import encode_tool_calls
    from dsv.core.tokenizer import Tokenizer
    from dsv.serve.grammar import GrammarVocab, Matcher

    t, tok = Templates(), Tokenizer.load(tiny_ckpt)
    vocab = GrammarVocab.from_tokenizer(tok)
    params = {"type": "object", "properties": {"q": {"type": "string"}, "n": {"type": "integer"},
                                               "tags": {"type": "array", "items": {"type": "string"}},
                                               "opt": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
              "required": ["q"]}  # fmt: skip
    grammar = lark_grammar(tool_call_grammar([_tool("f", params)], t))
    check_grammar(grammar)
    for args in ({"q": 'a <b> "c"\nd'}, {"q": "", "n": 3, "tags": ["x"]}, {"q": "x", "opt": None},
                 {"q": "x", "opt": "y"}):  # fmt: skip
        text = encode_tool_calls([{"type": "function", "function": {"name": "f", "arguments": args}}], t)
        m = Matcher(vocab, grammar)
        assert all(m.consume(i) for i in tok.encode(text, add_bos=False)), (args, m.error)
        assert m.consume(tok.eos_id) and m.done, args
    # Out of order, a missing required parameter, a wrong type: outside the grammar.
    for args in ({"n": 3, "q": "x"}, {"n": 3}, {"q": "x", "n": "three"}):
        text = encode_tool_calls([{"type": "function", "function": {"name": "f", "arguments": args}}], t)
        m = Matcher(vocab, grammar)
        assert not all(m.consume(i) for i in tok.encode(text, add_bos=False)) or not m.consume(tok.eos_id), args


def test_images_audio_and_files_are_refused_by_name(server: Any) -> None:
    import httpx

    for part in ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                 {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                 {"type": "file", "file": {"file_id": "f"}}):  # fmt: skip
        body = {"model": "dsv-tiny", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "what is this?"}, part]}]}  # fmt: skip
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["param"] == "messages.1.content"
        assert f"part 1 is `{part['type']}`" in err["message"] and "text only" in err["message"], err


def test_strict_tools_in_auto_mode_constrain_a_call_the_model_starts(tiny_ckpt: Path) -> None:
    # Free text, or text and then a call: a strict tool's call follows its schema, a non-strict
    # tool's parameters are free.
    from dsv.core.chat import encode_tool_calls
    from dsv.core.tokenizer import Tokenizer
    from dsv.serve.grammar import GrammarVocab, Matcher

    t, tok = Templates(), Tokenizer.load(tiny_ckpt)
    vocab = GrammarVocab.from_tokenizer(tok)
    strict = _tool("f", {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    loose = {"type": "function", "function": {"name": "g"}}
    grammar = lark_grammar(tool_call_grammar([strict, loose], t, start="auto", several=True))
    check_grammar(grammar)

    def accepts(text: str) -> bool:
        m = Matcher(vocab, grammar)
        return all(m.consume(i) for i in tok.encode(text, add_bos=False)) and m.consume(tok.eos_id)

    def call(name: str, args: dict[str, Any]) -> str:
        return encode_tool_calls([{"type": "function", "function": {"name": name, "arguments": args}}], t)

    assert accepts("Just text, <b>markup</b> too.")
    assert accepts("Let me look." + call("f", {"n": 3})) and accepts(call("g", {"anything": [1, "x"]}))
    assert not accepts("Let me look." + call("f", {"n": "three"}))
    assert not accepts(call("f", {})) and not accepts(call("h", {"n": 1}))


def test_strict_tools_in_auto_mode_through_the_api(
    tiny_ckpt: Path, live_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dsv.serve import load_native_app
    from dsv.serve.engine import Engine, GenParams

    seen: list[GenParams] = []
    real_submit = Engine.submit

    def submit(self: Engine, prompt: list[int], params: GenParams, on_event: Any) -> int:
        seen.append(params)
        return real_submit(self, prompt, params, on_event)

    monkeypatch.setattr(Engine, "submit", submit)
    app = load_native_app(str(tiny_ckpt), model_name="dsv-tiny", max_model_len=4096, engine_process=False)
    tool = _tool("f", {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]})
    with live_server(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        kw: dict[str, Any] = {"model": "dsv-tiny", "messages": ASK, "temperature": 1.0, "seed": 0, "max_tokens": 24}
        free = client.chat.completions.create(tools=[tool], **kw)
        strict = client.chat.completions.create(tools=[{**tool, "function": {**tool["function"], "strict": True}}],
                                                **kw)  # fmt: skip
    assert not seen[0].grammar and seen[1].grammar, "only strict tools constrain an auto request"
    # Text stays free: the random model writes text either way.
    assert free.choices[0].message.content and strict.choices[0].message.content
