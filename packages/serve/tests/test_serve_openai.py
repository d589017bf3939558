"""The official ``openai`` client against a real ``dsv serve`` (uvicorn thread, 127.0.0.1).

The model is the fixture's tiny checkpoint trained to follow a fixed script (see conftest), so
greedy decoding (temperature 0) gives known answers through the real engine and parser.

Run: ``pytest packages/serve/tests/test_serve_openai.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest

from dsv.core.chat import Templates, encode_messages
from dsv.serve.engine import GenParams


@pytest.fixture(scope="module")
def client(trained_server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=trained_server.url + "/v1", api_key="sk-test", max_retries=0)


def test_models_and_auth(client: openai.OpenAI, trained_server: Any) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == ["dsv-tiny", "dsv-tiny-reasoner"]
    card = client.models.retrieve("dsv-tiny-reasoner")
    assert card.id == "dsv-tiny-reasoner" and card.model_extra == {"max_model_len": 1024}
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4")
    assert e.value.body["code"] == "model_not_found"
    bad = openai.OpenAI(base_url=trained_server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert httpx.get(trained_server.url + "/health").json()["status"] == "ok"


def test_tokenize_and_detokenize(script: SimpleNamespace, client: openai.OpenAI, trained_server: Any) -> None:
    url, key = trained_server.url, {"Authorization": "Bearer sk-test"}
    assert httpx.post(url + "/tokenize", json={"model": "dsv-tiny", "prompt": "hi"}).status_code == 401
    assert httpx.get(url + "/metrics").status_code == 200, "monitoring needs no key"
    # Chat messages count as the chat endpoint counts them, thinking and tools included.
    for model in ("dsv-tiny", "dsv-tiny-reasoner"):
        body = {"model": model, "messages": script.ASK, "tools": [script.WEATHER_TOOL]}
        counted = httpx.post(url + "/tokenize", json=body, headers=key).json()
        chat = client.chat.completions.create(max_tokens=1, **body)
        assert chat.usage is not None and counted["count"] == chat.usage.prompt_tokens == len(
            counted["tokens"]
        )
        assert counted["max_model_len"] == 1024
    text = "Weather in Paris?"
    ids = httpx.post(url + "/tokenize", json={"model": "dsv-tiny", "prompt": text}, headers=key).json()[
        "tokens"
    ]
    back = httpx.post(url + "/detokenize", json={"model": "dsv-tiny", "tokens": ids}, headers=key)
    assert back.json() == {"prompt": text}
    for path, body, param in (
        ("/detokenize", {"model": "dsv-tiny", "tokens": [10**6]}, "tokens"),
        ("/tokenize", {"model": "dsv-tiny", "prompt": "a", "messages": script.ASK}, None),
        ("/tokenize", {"model": "gpt-4", "prompt": "a"}, "model"),
    ):
        r = httpx.post(url + path, json=body, headers=key)
        assert 400 <= r.status_code < 500 and r.json()["error"]["param"] == param, r.text


def test_thinking_on_and_off(script: SimpleNamespace, client: openai.OpenAI) -> None:
    on = client.chat.completions.create(
        model="dsv-tiny-reasoner", messages=script.GREET, temperature=0, max_tokens=40
    )
    msg = on.choices[0].message
    assert msg.content == "Hello there!" and msg.reasoning_content == "say hello"  # type: ignore[attr-defined]
    assert on.choices[0].finish_reason == "stop"
    body_switch = client.chat.completions.create(
        model="dsv-tiny",
        messages=script.GREET,
        temperature=0,
        max_tokens=40,
        extra_body={"thinking": {"type": "enabled"}},
    )
    assert body_switch.choices[0].message.content == "Hello there!"
    off = client.chat.completions.create(model="dsv-tiny", messages=script.GREET, temperature=0, max_tokens=8)
    assert getattr(off.choices[0].message, "reasoning_content", None) is None
    assert off.usage is not None and off.usage.completion_tokens <= 8


def test_streaming_reasoning_then_content(script: SimpleNamespace, client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="dsv-tiny-reasoner", messages=script.GREET, temperature=0, max_tokens=40, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    reasoning, content, order, usage, finish = "", "", [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            r = getattr(c.delta, "reasoning_content", None)
            if r:
                reasoning += r
                order.append("r")
            if c.delta.content:
                content += c.delta.content
                order.append("c")
            finish = c.finish_reason or finish
    assert (reasoning, content, finish) == ("say hello", "Hello there!", "stop")
    assert order == sorted(order, key=lambda k: k != "r"), "reasoning pieces come before content"
    assert (
        usage is not None
        and usage.completion_tokens > 0
        and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    )


def test_tool_call_round_trip(script: SimpleNamespace, client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model="dsv-tiny", messages=script.ASK, tools=[script.WEATHER_TOOL], temperature=0, max_tokens=200
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    # Send the returned message back with the tool result: the model answers.
    messages = [*script.ASK, choice.message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]  # fmt: skip
    second = client.chat.completions.create(
        model="dsv-tiny", messages=messages, tools=[script.WEATHER_TOOL], temperature=0, max_tokens=40
    )
    assert (
        second.choices[0].message.content == "It is sunny in Paris."
        and second.choices[0].finish_reason == "stop"
    )


def test_tool_call_streamed(script: SimpleNamespace, client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="dsv-tiny",
        messages=script.ASK,
        tools=[script.WEATHER_TOOL],
        temperature=0,
        max_tokens=200,
        stream=True,
    )
    calls = [tc for chunk in stream for c in chunk.choices for tc in (c.delta.tool_calls or [])]
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Paris"})
    ]


def test_named_tool_choice_forces_the_call(script: SimpleNamespace, client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="dsv-tiny", messages=script.ASK, tools=[script.WEATHER_TOOL], temperature=0, max_tokens=200,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    assert out.choices[0].message.tool_calls[0].function.name == "get_weather"  # type: ignore[index]


def test_required_tool_choice_forces_the_opening_of_a_call(
    script: SimpleNamespace, client: openai.OpenAI
) -> None:
    kw: dict[str, Any] = {"model": "dsv-tiny", "messages": script.ASK, "tools": [script.WEATHER_TOOL],
                          "temperature": 0, "max_tokens": 200}  # fmt: skip
    auto = client.chat.completions.create(**kw)
    required = client.chat.completions.create(tool_choice="required", **kw)
    calls = [[(c.function.name, json.loads(c.function.arguments)) for c in r.choices[0].message.tool_calls or []]
             for r in (auto, required)]  # fmt: skip
    assert calls[0] == calls[1] == [("get_weather", {"city": "Paris"})]
    assert required.choices[0].finish_reason == "tool_calls"
    # The call's opening (with the one tool's name) was part of the prompt, not generated.
    assert auto.usage is not None and required.usage is not None
    assert required.usage.prompt_tokens > auto.usage.prompt_tokens
    assert required.usage.completion_tokens < auto.usage.completion_tokens


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[GenParams, list[int]]]:
    """(params, generated tokens) of every request an in-process engine gets, in order."""
    from dsv.serve.engine import Engine, TokenEvent

    seen: list[tuple[GenParams, list[int]]] = []
    real_submit = Engine.submit

    def submit(self: Engine, prompt: list[int], params: GenParams, on_event: Any) -> int:
        tokens: list[int] = []
        seen.append((params, tokens))

        def record(ev: Any) -> None:
            if isinstance(ev, TokenEvent):
                tokens.append(ev.token)
            on_event(ev)

        return real_submit(self, prompt, params, record)

    monkeypatch.setattr(Engine, "submit", submit)
    return seen


def _tools(*names: str) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in names]


def test_required_tool_choice_with_several_tools_names_a_listed_tool(
    script: SimpleNamespace, trained_ckpt: Path, live_server: Any, recorded: list[tuple[GenParams, list[int]]]
) -> None:
    # The model was trained on one tool (get_weather); shown two others it writes a name of neither
    # after the forced `invoke name="` (it writes `true"`). The engine must keep the name to the
    # listed tools. The generated tokens are recorded at the engine (in this process).
    from dsv.core.tokenizer import Tokenizer
    from dsv.serve import load_native_app

    app = load_native_app(str(trained_ckpt), model_name="dsv-tiny", max_model_len=1024, engine_process=False)
    with live_server(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        kw: dict[str, Any] = {"model": "dsv-tiny", "messages": script.ASK, "tools": _tools("get_news", "get_time"),
                              "temperature": 0, "max_tokens": 12}  # fmt: skip
        client.chat.completions.create(tool_choice="required", **kw)
        client.chat.completions.create(tool_choice="auto", **kw)
    decode = Tokenizer.load(trained_ckpt).decode
    (required, out), (auto, _) = recorded
    assert required.grammar and not auto.grammar, "only a forced call is constrained"
    assert any(decode(out).startswith(f'{n}">') for n in ("get_news", "get_time")), decode(out)


def test_forced_tool_choice_in_thinking_mode_calls_after_the_reasoning(
    script: SimpleNamespace, trained_ckpt: Path, live_server: Any, recorded: list[tuple[GenParams, list[int]]]
) -> None:
    # Shown tools, the fixture model does not reason its way to `</think>`; a +100 bias on that
    # token makes every free token `</think>`, so the reasoning ends at once and what the engine
    # does after it is plain to see.
    from dsv.core.tokenizer import Tokenizer
    from dsv.serve import load_native_app

    tok = Tokenizer.load(trained_ckpt)
    (end,) = tok.encode("</think>", add_bos=False)
    t = Templates.from_checkpoint(trained_ckpt)
    opening = f'</think>{t.tool_calls_start}>\n<{t.dsml_token}invoke name="'
    app = load_native_app(str(trained_ckpt), model_name="dsv-tiny", max_model_len=1024, engine_process=False)
    with live_server(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        kw: dict[str, Any] = {"model": "dsv-tiny-reasoner", "messages": script.GREET, "max_tokens": 40,
                              "logit_bias": {str(end): 100}}  # fmt: skip
        client.chat.completions.create(tools=_tools("get_time"), **kw)
        named = {"type": "function", "function": {"name": "get_time"}}
        client.chat.completions.create(tools=_tools("get_time"), tool_choice=named, **kw)
        client.chat.completions.create(tools=_tools("get_news", "get_time"), tool_choice="required", **kw)
    free, named_out, required_out = (tok.decode(out) for _, out in recorded)
    assert free == "</think>" * 40
    # After the reasoning the whole call is under the engine's grammar: `</think>` (biased to +100)
    # no longer fits, the opening and the listed name follow.
    assert named_out.startswith(f'{opening}get_time">'), named_out
    assert any(required_out.startswith(f'{opening}{n}">') for n in ("get_news", "get_time")), required_out
    assert all(p.grammar and p.grammar_after == (end,) for p, _ in recorded[1:])


def test_n_stop_logprobs_usage(script: SimpleNamespace, client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="dsv-tiny", messages=[{"role": "user", "content": "count"}], n=3, temperature=1.0, seed=7,
        max_tokens=6, logprobs=True, top_logprobs=2,
    )  # fmt: skip
    assert [c.index for c in out.choices] == [0, 1, 2]
    for c in out.choices:
        assert c.logprobs is not None and c.logprobs.content
        for entry in c.logprobs.content:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
    assert out.usage is not None and out.usage.completion_tokens == sum(
        len(c.logprobs.content) for c in out.choices
    )  # type: ignore[union-attr]
    # stop sequences cut the text before the stop string
    full = client.chat.completions.create(
        model="dsv-tiny", messages=script.ASK, tools=[script.WEATHER_TOOL], temperature=0, max_tokens=200
    )
    assert full.choices[0].message.tool_calls
    after = client.chat.completions.create(model="dsv-tiny", messages=[*script.ASK, {"role": "assistant", "content": "",
        "tool_calls": [script.CALL]}, {"role": "tool", "content": "sunny, 21 C"}], tools=[script.WEATHER_TOOL], temperature=0, max_tokens=40, stop=["sunny"])  # fmt: skip
    assert after.choices[0].message.content == "It is " and after.choices[0].finish_reason == "stop"
    # usage counts the tokens generated up to the stop string (the stream ended before the engine did)
    unstopped = client.chat.completions.create(model="dsv-tiny", messages=[*script.ASK, {"role": "assistant",
        "content": "", "tool_calls": [script.CALL]}, {"role": "tool", "content": "sunny, 21 C"}],
        tools=[script.WEATHER_TOOL], temperature=0, max_tokens=40)  # fmt: skip
    assert after.usage is not None and unstopped.usage is not None
    assert 0 < after.usage.completion_tokens < unstopped.usage.completion_tokens


def test_logprobs_refused_in_thinking_mode(script: SimpleNamespace, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="dsv-tiny-reasoner", messages=script.GREET, logprobs=True)
    assert e.value.body["param"] == "logprobs"


def test_completions_endpoint(script: SimpleNamespace, client: openai.OpenAI, trained_ckpt: Path) -> None:
    # The raw encoded greeting prompt: the model continues with the script's reasoning, cut at 5 tokens.
    prompt = encode_messages(script.GREET, thinking=True, templates=Templates.from_checkpoint(trained_ckpt))
    out = client.completions.create(model="dsv-tiny", prompt=prompt, max_tokens=5, temperature=0, logprobs=2)
    choice = out.choices[0]
    assert out.usage is not None and out.usage.completion_tokens == 5 and choice.finish_reason == "length"
    assert choice.logprobs is not None and len(choice.logprobs.tokens) == 5
    assert "".join(choice.logprobs.tokens) == choice.text and choice.text
    assert "say hello</think>Hello there!".startswith(choice.text)
    again = client.completions.create(model="dsv-tiny", prompt=prompt, max_tokens=5, temperature=0)
    assert again.choices[0].text == choice.text, "greedy decoding is deterministic"


def test_errors_in_openai_shape(script: SimpleNamespace, client: openai.OpenAI, trained_server: Any) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=script.GREET)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="dsv-tiny", messages=[{"role": "user", "content": "x " * 3000}], max_tokens=10
        )
    assert e.value.body["code"] == "context_length_exceeded" and "1024" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="dsv-tiny",
            messages=script.GREET,
            tools=[{"type": "function", "function": {"name": "bad name!"}}],
        )
    assert e.value.body["code"] == "invalid_tool_schema"
    # Token ids the model does not have are the client's mistake, caught before the engine sees them.
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="dsv-tiny", prompt=[5, 10**6], max_tokens=2)
    assert e.value.body["param"] == "prompt" and "1000000" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="dsv-tiny", prompt=[[5, 6], [7, 10**6]], max_tokens=2)
    assert e.value.body["param"] == "prompt" and "1000000" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="dsv-tiny", prompt=[[5, 6], []], max_tokens=2)
    assert e.value.body["param"] == "prompt" and "empty" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="dsv-tiny", messages=script.GREET, top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs" and "logprobs: true" in e.value.body["message"]
    r = httpx.post(trained_server.url + "/v1/chat/completions", content=b"{not json",
                   headers={"Authorization": "Bearer sk-test"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    done = client.completions.create(model="dsv-tiny", prompt="hi", max_tokens=2, temperature=0)
    assert done.usage is not None
    metrics = httpx.get(trained_server.url + "/metrics").text
    for name in ("dsv_queue_depth", "dsv_running_requests", "dsv_tokens_per_second", "dsv_cache_usage_ratio",
                 "dsv_time_to_first_token_seconds_bucket", "dsv_inter_token_latency_seconds_bucket",
                 "dsv_choice_duration_seconds_bucket", "dsv_prefix_cache_hit_blocks"):  # fmt: skip
        assert name in metrics
    from prometheus_client.parser import text_string_to_metric_families

    values = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for family in text_string_to_metric_families(metrics) for s in family.samples}  # fmt: skip
    # Counted over the whole session's server, so at least what this test itself caused.
    assert values[("dsv_error_responses_total", (("status", "400"),))] >= 6
    assert values[("dsv_error_responses_total", (("status", "404"),))] >= 1
    assert values[("dsv_finished_choices_total", (("reason", "length"),))] >= 1
    assert values[("dsv_prompt_tokens_total", ())] >= done.usage.prompt_tokens
