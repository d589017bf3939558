"""Fuzz the HTTP layer with 1,000 malformed requests: every answer is a 4xx in the OpenAI error shape.

Runs against the app in-process (fastapi TestClient) with the random tiny checkpoint.

Run: ``pytest packages/serve/tests/test_serve_fuzz.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.slow

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
_BAD_FIELDS: list[tuple[str, Any]] = [
    ("model", 5), ("model", "nope"), ("messages", []), ("messages", "hi"), ("messages", [{"role": "robot"}]),
    ("messages", [{"role": "user"}]), ("messages", [{"role": "tool", "content": "x"}]),
    ("messages", [{"role": "user", "content": 3}]), ("max_tokens", 0), ("max_tokens", -5), ("max_tokens", 10**9),
    ("max_tokens", "ten"), ("temperature", 9), ("top_p", 0), ("n", 0), ("n", 99), ("stop", [""]), ("stop", ["a"] * 9),
    ("tools", [{"type": "function", "function": {"name": ""}}]), ("tools", "x"),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]),
    ("tool_choice", {"type": "function", "function": {"name": "missing"}}), ("tool_choice", "sometimes"),
    ("thinking", {"type": "maybe"}), ("logprobs", "maybe"), ("top_logprobs", 50), ("stream", "x"),
    ("prompt", []), ("prompt", ["a", 5]), ("prompt", {"a": 1}), ("response_format", {"type": "xml"}),
    ("prompt", [5, 10**6]), ("prompt", [-1]), ("presence_penalty", 3), ("frequency_penalty", -2.5),
    ("logit_bias", {"a": 1}), ("logit_bias", {"5": 101}), ("logit_bias", {"-1": 1}), ("logit_bias", {"99999": 1}),
    ("logit_bias", {str(i): 1 for i in range(301)}), ("logit_bias", [1]), ("prompt", [[1, 2], []]), ("top_logprobs", 3),
    ("seed", 2**63), ("seed", -(2**63) - 1), ("temperature", "NaN"), ("min_p", 1.5), ("repetition_penalty", 0),
    ("min_tokens", -1), ("stop_token_ids", [10**6]), ("chat_template_kwargs", {"thinking": "yes"}),
    ("chat_template_kwargs", {"tools_style": 1}), ("guided_regex", "("), ("guided_choice", []),
    ("response_format", {"type": "json_schema"}), ("use_beam_search", True), ("no_such_field", 1),
]  # fmt: skip
_bad_field = st.sampled_from(_BAD_FIELDS)


def _applies(key: str, chat: bool) -> bool:
    """Every entry is a 4xx on both endpoints: a field of the other endpoint is unknown there, which
    is a 400 naming it (nothing is silently dropped)."""
    return True


def _request_fields() -> set[str]:
    from dsv.serve.schemas import ChatCompletionRequest, CompletionRequest

    return set(ChatCompletionRequest.model_fields) | set(CompletionRequest.model_fields)


@pytest.fixture(scope="module")
def client(tiny_ckpt: Path) -> TestClient:
    from dsv.serve import load_native_app

    app = load_native_app(
        str(tiny_ckpt), model_name="m", max_model_len=256, max_tokens_limit=64, num_blocks=64
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c  # type: ignore[misc]


def _check(r: Any) -> None:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert (
        set(err) == {"message", "type", "param", "code"}
        and isinstance(err["message"], str)
        and err["message"]
    )


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=st.binary(max_size=64) | _json.map(lambda v: json.dumps(v).encode()),
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"]),
)
def test_garbage_bodies(client: TestClient, body: bytes, path: str) -> None:
    # Random JSON is now and then a valid request (``{"tokens": []}`` to /detokenize, ``{}`` or a bare
    # ``prompt`` to /tokenize): those must succeed, not 4xx, and are not what this test is about.
    assume(not _valid_tokenizer_request(path, body))
    _check(client.post(path, content=body))


def _valid_tokenizer_request(path: str, body: bytes) -> bool:
    from pydantic import ValidationError

    from dsv.serve.schemas import DetokenizeRequest, TokenizeRequest

    if path not in ("/tokenize", "/detokenize"):
        return False
    try:
        req = (TokenizeRequest if path == "/tokenize" else DetokenizeRequest).model_validate_json(body)
    except (ValidationError, ValueError):
        return False
    return all(0 <= t < 1024 for t in getattr(req, "tokens", []))


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    fields=st.lists(_bad_field, min_size=1, max_size=3),
    chat=st.booleans(),
    extra=st.dictionaries(st.text(max_size=6), _json, max_size=2),
)
def test_schema_violations(
    client: TestClient, fields: list[tuple[str, Any]], chat: bool, extra: dict[str, Any]
) -> None:
    body: dict[str, Any] = {**extra, "model": "m", "max_tokens": 2}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    for k, v in fields:
        body[k] = v
    path = "/v1/chat/completions" if chat else "/v1/completions"
    r = client.post(path, json=body)
    answered = r.status_code == 200 and ("choices" in r.json() or r.text.startswith("data:"))
    if any(_applies(k, chat) for k, _ in fields):
        _check(r)
    elif extra.keys() & _request_fields():
        # Random values for real fields (n=None, stream=true, ...): valid or refused, nothing else.
        if not answered:
            _check(r)
    else:
        # No bad field applies to this endpoint (e.g. tools on /v1/completions): a real answer.
        assert answered, r.text[:300]


@pytest.mark.parametrize(
    ("field", "chat"),
    [(f, chat) for f in _BAD_FIELDS for chat in (True, False) if _applies(f[0], chat)],
    ids=lambda v: ("chat" if v else "completions") if isinstance(v, bool) else f"{v[0]}={json.dumps(v[1])[:20]}",
)
def test_each_bad_field_alone_is_a_4xx_where_it_applies(
    client: TestClient, field: tuple[str, Any], chat: bool
) -> None:
    """Every entry of the fuzz list, alone on an otherwise valid body: a field the endpoint reads is
    refused, so a validator removed from the API fails here whatever the fuzzer happens to draw."""
    key, value = field
    body: dict[str, Any] = {"model": "m", "max_tokens": 2}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    body[key] = value
    _check(client.post("/v1/chat/completions" if chat else "/v1/completions", json=body))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": [""]}, "prompt"),
        ({"prompt": "hi", "suffix": "!"}, "suffix"),
        ({"prompt": "hi", "best_of": 3}, "best_of"),
        ({"prompt": "hi", "n": 2, "best_of": 3}, "best_of"),
    ],
)
def test_fields_that_would_change_the_answer_are_refused_not_ignored(
    client: TestClient, body: dict[str, Any], param: str
) -> None:
    r = client.post("/v1/completions", json={"model": "m", "max_tokens": 2, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("field", ["functions", "function_call"])
def test_the_deprecated_function_fields_point_to_tools(client: TestClient, field: str) -> None:
    value = [{"name": "f", "parameters": {"type": "object"}}] if field == "functions" else "auto"
    body = {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], field: value}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == field and "tools" in r.text, r.text


def test_best_of_equal_to_n_and_an_empty_suffix_are_accepted(client: TestClient) -> None:
    body = {"model": "m", "prompt": "hi", "max_tokens": 2, "n": 2, "best_of": 2, "suffix": ""}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
