"""Structured outputs: grammars enforced token by token in the engine, and through the API.

- A property test over generated JSON schemas (objects, arrays, enums, nested objects, required
  fields, bounded numbers and strings): every output of a random-weight tiny model parses and
  validates with ``jsonschema``. Strings have a ``maxLength`` and numbers a ``multipleOf``: without
  them a random model's string or digits need not end before the token limit.
- The batched mask (``fill_masks``) equals the one-matcher-at-a-time mask.
- Through a real ``dsv serve`` with the official ``openai`` client: ``response_format``
  ``json_object``/``json_schema`` and ``chat.completions.parse`` give valid JSON; in thinking mode
  the reasoning stays the trained model's own and only the answer is constrained; a schema feature
  the engine cannot enforce is a 400 naming it.

Run: ``pytest packages/serve/tests/test_serve_grammar.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from dsv.serve.engine import Engine, GenParams
from dsv.serve.grammar import (
    GrammarError,
    GrammarVocab,
    check_grammar,
    choice_grammar,
    fill_masks,
    json_object_grammar,
    json_schema_grammar,
    regex_grammar,
)

# ---------------------------------------------------------------- generated schemas
_names = st.sampled_from(["a", "b", "name", "n", "items", "ok", "kind", "x_1"])
_leaf = st.one_of(
    st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
              st.integers(-50, 50), st.integers(0, 100)),
    # A bounded number still has unbounded digits; a step keeps a random model's digits finite.
    st.builds(lambda lo, span, step: {"type": "number", "minimum": lo, "maximum": lo + span, "multipleOf": step},
              st.integers(-5, 5), st.integers(1, 10), st.sampled_from([0.5, 0.25])),
    st.builds(lambda lo, extra: {"type": "string", "minLength": lo, "maxLength": lo + extra},
              st.integers(0, 3), st.integers(0, 6)),
    st.just({"type": "boolean"}),
    st.lists(st.text("abcxyz _-", min_size=1, max_size=6), min_size=1, max_size=4, unique=True).map(
        lambda vs: {"enum": vs}
    ),
)


def _object(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    def build(props: dict[str, dict[str, Any]], required_mask: list[bool]) -> dict[str, Any]:
        names = list(props)
        required = [n for n, r in zip(names, required_mask, strict=False) if r]
        return {"type": "object", "properties": props, "required": required, "additionalProperties": False}

    return st.builds(build, st.dictionaries(_names, children, min_size=1, max_size=3), st.lists(st.booleans(), max_size=3))


_schema = st.recursive(
    _leaf,
    lambda inner: _object(inner)
    | st.builds(lambda items, lo, extra: {"type": "array", "items": items, "minItems": lo, "maxItems": lo + extra},
                inner, st.integers(0, 1), st.integers(0, 2)),
    max_leaves=5,
).map(lambda s: s if s.get("type") == "object" else {"type": "object", "properties": {"v": s}, "required": ["v"],
                                                       "additionalProperties": False})


@pytest.fixture(scope="module")
def engine(tiny_ckpt: Path) -> Engine:
    from dsv.core.checkpoint import load_pretrained

    model, tok = load_pretrained(str(tiny_ckpt), with_tokenizer=True)
    return Engine.for_model(model.eval(), model.config, tokenizer=tok, num_blocks=256)


def _text(engine: Engine, tokens: list[int]) -> str:
    tok = engine.tokenizer
    return str(tok.decode([t for t in tokens if t != tok.eos_id]))


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=_schema, seed=st.integers(0, 2**31))
def test_every_output_of_a_random_model_parses_and_validates(engine: Engine, schema: dict[str, Any], seed: int) -> None:
    grammar = json_schema_grammar(schema)
    eos = engine.tokenizer.eos_id
    prompt = engine.tokenizer.encode("Answer in JSON: ")
    params = [GenParams(temperature=1.0, seed=seed + i, max_tokens=400, grammar=grammar, stop_token_ids=(eos,))
              for i in range(3)]  # fmt: skip
    for out in engine.generate_many([prompt] * 3, params):
        assert out.finish_reason == "stop", (schema, _text(engine, out.tokens))
        jsonschema.validate(json.loads(_text(engine, out.tokens)), schema)


def test_json_object_regex_and_choices(engine: Engine) -> None:
    eos = engine.tokenizer.eos_id
    prompt = engine.tokenizer.encode("hello")
    cases = [
        (json_object_grammar(), lambda t: isinstance(json.loads(t), dict)),
        (regex_grammar(r"[0-9]{3}-[a-z]{2}"), lambda t: len(t) == 6 and t[:3].isdigit() and t[3] == "-"),
        (choice_grammar(["yes", "no", "maybe so"]), lambda t: t in {"yes", "no", "maybe so"}),
    ]
    for grammar, ok in cases:
        for out in engine.generate_many([prompt] * 2, [GenParams(temperature=1.0, seed=s, max_tokens=300,
                                                                   grammar=grammar, stop_token_ids=(eos,))
                                                         for s in (1, 2)]):  # fmt: skip
            text = _text(engine, out.tokens)
            assert out.finish_reason == "stop" and ok(text), text


def test_the_grammar_waits_for_its_trigger(engine: Engine) -> None:
    """``grammar_after``: free tokens first (the reasoning), the grammar from just after the trigger."""
    eos = engine.tokenizer.eos_id
    prompt = engine.tokenizer.encode("hello")
    free = engine.generate_many([prompt], GenParams(temperature=0.0, max_tokens=6))[0].tokens
    trigger = (free[2],)  # greedy reaches this token at step 3, unconstrained
    schema = {"type": "object", "properties": {"k": {"enum": ["a", "b"]}, "n": {"type": "integer", "minimum": 0,
              "maximum": 9}}, "required": ["k", "n"], "additionalProperties": False}  # fmt: skip
    out = engine.generate_many([prompt], GenParams(temperature=0.0, max_tokens=300, grammar=json_schema_grammar(schema),
                                                   grammar_after=trigger, stop_token_ids=(eos,)))[0]  # fmt: skip
    assert out.tokens[:3] == free[:3], "before the trigger the output is the model's own"
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(_text(engine, out.tokens[3:])), schema)


def test_batched_masks_equal_one_at_a_time(engine: Engine) -> None:
    vocab = GrammarVocab.from_tokenizer(engine.tokenizer, engine.vocab_size)
    grammars = [json_object_grammar(), regex_grammar("[a-c]+z"), json_schema_grammar({"enum": ["ab", "cd"]})]
    matchers = [vocab.matcher(g) for g in grammars]
    singles = [vocab.matcher(g) for g in grammars]
    for step in range(4):
        logits = torch.zeros(len(grammars) + 1, engine.vocab_size)
        fill_masks(matchers, logits, [0, 2, 3])  # row 1 is not constrained
        assert (logits[1] == 0).all()
        for row, m in zip([0, 2, 3], singles, strict=True):
            assert torch.equal(logits[row].isfinite(), m.allowed()), (step, row)
        for m, s in zip(matchers, singles, strict=True):  # advance both by the first allowed token
            tok = int(s.allowed().nonzero()[0])
            assert m.consume(tok) and s.consume(tok)


def test_unsupported_schema_features_are_named() -> None:
    for schema, named in (
        ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, '"if"'),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "string", "format": "no-such-format"}, "no-such-format"),
    ):
        with pytest.raises(GrammarError, match=named):
            check_grammar(json_schema_grammar(schema))
    with pytest.raises(GrammarError, match="regular expression"):
        regex_grammar("(")


# ---------------------------------------------------------------- through the API
class Forecast(BaseModel):
    sky: Literal["sunny", "rain", "snow"]
    warm: bool
    celsius: int = Field(ge=-20, le=40)


@pytest.fixture(scope="module")
def client(trained_server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=trained_server.url + "/v1", api_key="sk-test", max_retries=0)


def test_response_format_through_the_openai_client(script: SimpleNamespace, client: openai.OpenAI) -> None:
    parsed = client.chat.completions.parse(model="dsv-tiny", messages=script.ASK, response_format=Forecast,
                                           temperature=1.0, seed=3, max_tokens=200)  # fmt: skip
    msg = parsed.choices[0].message
    assert parsed.choices[0].finish_reason == "stop" and isinstance(msg.parsed, Forecast), msg.content
    for seed in range(3):
        # Any object: strings are unbounded, so the token limit may cut one (finish_reason "length",
        # as OpenAI's API does); what is there is JSON's start either way.
        out = client.chat.completions.create(model="dsv-tiny", messages=script.GREET, temperature=1.0, seed=seed,
                                             max_tokens=300, response_format={"type": "json_object"})  # fmt: skip
        text = out.choices[0].message.content or ""
        if out.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert out.choices[0].finish_reason == "length" and text.startswith("{"), text
    # Streaming gives the same constrained text for the same seed.
    kw: dict[str, Any] = {"model": "dsv-tiny", "messages": script.ASK, "temperature": 1.0, "seed": 5,
                          "max_tokens": 200, "response_format": {"type": "json_schema", "json_schema": {
                              "name": "f", "schema": Forecast.model_json_schema(), "strict": True}}}  # fmt: skip
    whole = client.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                       if c.choices)  # fmt: skip
    assert whole == streamed and Forecast.model_validate_json(whole or "")


def test_thinking_keeps_its_reasoning_free(script: SimpleNamespace, client: openai.OpenAI) -> None:
    """The trained model reasons "say hello" before `</think>`; under a schema that reasoning is the
    same as without one, and only the answer after it follows the schema."""
    out = client.chat.completions.create(model="dsv-tiny-reasoner", messages=script.GREET, temperature=0,
                                         max_tokens=200, response_format={"type": "json_object"})  # fmt: skip
    msg = out.choices[0].message
    assert msg.reasoning_content == "say hello"  # type: ignore[attr-defined]
    assert isinstance(json.loads(msg.content or ""), dict)
    assert out.usage is not None and out.usage.completion_tokens_details is not None
    assert 0 < out.usage.completion_tokens_details.reasoning_tokens < out.usage.completion_tokens


def test_vllm_guided_fields_and_unsupported_schemas(script: SimpleNamespace, trained_server: Any) -> None:
    url, key = trained_server.url + "/v1/chat/completions", {"Authorization": "Bearer sk-test"}
    base = {"model": "dsv-tiny", "messages": script.GREET, "max_tokens": 60, "temperature": 1.0, "seed": 1}
    for field, value, ok in (
        ("guided_choice", ["red", "green"], lambda t: t in ("red", "green")),
        ("guided_regex", "[0-9]{4}", lambda t: len(t) == 4 and t.isdigit()),
        ("guided_json", {"type": "object", "properties": {"k": {"enum": [1, 2]}}, "required": ["k"],
                         "additionalProperties": False}, lambda t: json.loads(t)["k"] in (1, 2)),
        ("structured_outputs", {"choice": ["up", "down"]}, lambda t: t in ("up", "down")),
    ):
        r = httpx.post(url, json={**base, field: value}, headers=key, timeout=120)
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["message"]["content"]
        assert ok(text), (field, text)
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}
    r = httpx.post(url, json={**base, "response_format": bad}, headers=key, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text
    assert "uniqueItems" in r.json()["error"]["message"]
    r = httpx.post(url, json={**base, "guided_regex": "(", "stream": True}, headers=key, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex", r.text
