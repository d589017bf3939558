"""The request fields clients written for OpenAI and vLLM send, and the errors that were 5xx.

Against a real ``dsv serve`` (uvicorn on 127.0.0.1, the random tiny checkpoint, greedy decoding
unless said): each vLLM field changes the output as vLLM documents it, an unknown field is a 400
naming it, usage carries reasoning and prefix-cached token counts, a 1,000-deep JSON body, an
out-of-range seed (streaming too, before any 200) and a NaN temperature are 400s that say what is
wrong, and a forward that raises for one request ends only that request.

Run: ``pytest packages/serve/tests/test_serve_api_fields.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from dsv.serve.engine import Engine, GenParams

KEY = {"Authorization": "Bearer sk-t"}


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, live_server: Any) -> Iterator[Any]:
    from dsv.serve import load_native_app

    app = load_native_app(str(tiny_ckpt), model_name="m", max_model_len=512, api_key="sk-t", num_blocks=128,
                          engine_process=False)  # fmt: skip
    with live_server(app) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="sk-t", max_retries=0)


@pytest.fixture(scope="module")
def tok(server: Any) -> Any:
    return server.app.state.backend.tokenizer


def _complete(client: openai.OpenAI, **kw: Any) -> Any:
    body = {"model": "m", "prompt": "The weather today", "max_tokens": 12, "temperature": 0, **kw}
    extra = {k: body.pop(k) for k in list(body) if k not in ("model", "prompt", "max_tokens", "temperature",
                                                             "seed", "stop", "logprobs", "echo", "logit_bias")}  # fmt: skip
    return client.completions.create(**body, extra_body=extra or None).choices[0]


# ---------------------------------------------------------------- errors that were 5xx
def test_a_deeply_nested_body_is_a_400(server: Any) -> None:
    deep = b'{"model": "m", "prompt": "x", "user": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    assert len(deep) < 2100
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize"):
        r = httpx.post(server.url + path, content=deep, headers=KEY)
        assert r.status_code == 400 and "nested" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 10**30])
def test_a_seed_outside_64_bits_is_a_400_streaming_or_not(server: Any, seed: int) -> None:
    for path, body in (("/v1/completions", {"prompt": "hi"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):  # fmt: skip
        for stream in (False, True):
            r = httpx.post(server.url + path, json={"model": "m", "max_tokens": 2, "seed": seed, "stream": stream,
                                                    **body}, headers=KEY)  # fmt: skip
            assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    # The ends of the range are fine.
    for seed in (2**63 - 1, -(2**63)):
        r = httpx.post(server.url + "/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2,
                                                             "seed": seed, "temperature": 1}, headers=KEY)  # fmt: skip
        assert r.status_code == 200, r.text


def test_non_finite_sampling_values_say_so(server: Any) -> None:
    for field in ("temperature", "top_p", "min_p", "presence_penalty", "repetition_penalty"):
        for value in (b"NaN", b"Infinity"):
            raw = b'{"model": "m", "prompt": "hi", "max_tokens": 2, "' + field.encode() + b'": ' + value + b"}"
            r = httpx.post(server.url + "/v1/completions", content=raw, headers=KEY)
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == field and "finite" in err["message"], r.text


def test_a_forward_that_raises_ends_only_its_request(tiny_ckpt: Path) -> None:
    """A model that raises whenever a poisoned token is in its input: the request that brings it
    fails, in prefill and in decode, and the others of the same steps finish as if alone."""
    from dsv.core.checkpoint import load_pretrained

    model, _ = load_pretrained(str(tiny_ckpt), with_tokenizer=False)
    poison = 77

    class Fragile(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model.eval()

        def forward(self, ids: torch.Tensor, **kw: Any) -> Any:
            if bool((ids == poison).any()):
                raise RuntimeError("poisoned input")
            return self.inner(ids, **kw)

    engine = Engine.for_model(Fragile(), model.config, num_blocks=64)
    clean = [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    greedy = GenParams(temperature=0.0, max_tokens=6, logit_bias=((poison, -100.0),))
    alone = [engine.generate_many([p], greedy)[0].tokens for p in clean]
    # Prefill: the poisoned prompt has the others' length, so they share one forward.
    # Decode: a request forced to generate the poison token breaks the next decode step.
    prompts = [clean[0], [5, poison, 7, 8], clean[1], clean[2]]
    params = [greedy, greedy, GenParams(temperature=0.0, max_tokens=6, logit_bias=((poison, 100.0),)), greedy]
    out = engine.generate_many(prompts, params)
    assert out[1].finish_reason == "error" and "poisoned" in out[1].error
    assert out[2].finish_reason == "error" and out[2].tokens == [poison]
    assert [out[0].tokens, out[3].tokens] == [alone[0], alone[2]]
    assert out[0].finish_reason == out[3].finish_reason == "length"
    # And the engine goes on serving.
    assert engine.generate_many([clean[1]], greedy)[0].tokens == alone[1]


# ---------------------------------------------------------------- known and unknown fields
def test_unknown_fields_are_named_and_known_ignored_ones_accepted(server: Any) -> None:
    url = server.url + "/v1/chat/completions"
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = httpx.post(url, json={**base, "frobnicate": 1, "zeta": 2}, headers=KEY)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "frobnicate" and "`frobnicate`, `zeta`" in err["message"]
    r = httpx.post(url, json={**base, "use_beam_search": True}, headers=KEY)
    assert r.status_code == 400 and "use_beam_search" in r.json()["error"]["message"], r.text
    r = httpx.post(url, json={**base, "use_beam_search": False, "metadata": {"a": "b"}, "store": False,
                              "service_tier": "auto", "priority": 0, "spaces_between_special_tokens": True},
                   headers=KEY)  # fmt: skip
    assert r.status_code == 200, r.text
    # A server may relax the check: the same app code, other settings (no engine started here).
    from dsv.serve.app import ServerSettings, create_app

    relaxed = create_app(server.app.state.backend, ServerSettings(model_name="m", allow_unknown_fields=True))
    body = {"model": "m", "prompt": "hi", "max_tokens": 1, "frobnicate": 1}
    assert TestClient(relaxed).post("/v1/completions", json=body).status_code == 200


def test_stop_token_ids_min_tokens_and_ignore_eos(client: openai.OpenAI, tok: Any) -> None:
    eos = tok.eos_id
    forced = {str(eos): 100}  # the model would end at once
    first = _complete(client, logit_bias=forced)
    assert first.finish_reason == "stop" and first.text == ""
    at_least = _complete(client, logit_bias=forced, min_tokens=5)
    assert at_least.finish_reason == "stop" and len(tok.encode(at_least.text)) >= 5
    on = _complete(client, logit_bias=forced, ignore_eos=True, skip_special_tokens=True, max_tokens=4)
    assert on.finish_reason == "length" and on.text == ""  # four EOS tokens, skipped as special
    kept = _complete(client, logit_bias=forced, ignore_eos=True, max_tokens=2)
    assert kept.text.count("<｜end▁of▁sentence｜>") == 2
    plain = _complete(client)
    ids = tok.encode(plain.text)
    stopped = _complete(client, stop_token_ids=[ids[2]])
    assert stopped.finish_reason == "stop" and tok.encode(stopped.text) == ids[:2], (plain.text, stopped.text)


def test_stop_strings_included_on_request(client: openai.OpenAI) -> None:
    text = _complete(client, max_tokens=16).text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = text[: text.index(stop)]
    assert _complete(client, max_tokens=16, stop=[stop]).text == cut
    assert _complete(client, max_tokens=16, stop=[stop], include_stop_str_in_output=True).text == cut + stop


def test_min_p_and_repetition_penalty(client: openai.OpenAI, tok: Any) -> None:
    greedy = _complete(client, max_tokens=24).text
    # min_p = 1 keeps only the top token: sampling at any temperature is then greedy.
    sampled = {_complete(client, max_tokens=24, temperature=1.5, seed=s).text for s in range(3)}
    assert len(sampled) > 1
    assert {_complete(client, max_tokens=24, temperature=1.5, seed=s, min_p=1.0).text for s in range(3)} == {greedy}
    # A strong repetition penalty: the random model's greedy loop is broken, fewer repeats.
    ids = tok.encode(greedy)
    penalised = tok.encode(_complete(client, max_tokens=24, repetition_penalty=5.0).text)
    assert len(set(ids)) < len(ids), "the fixture's greedy output repeats tokens"
    assert len(penalised) - len(set(penalised)) < len(ids) - len(set(ids))


def test_thinking_switch_as_vllm_sends_it_and_usage_details(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    on = client.chat.completions.create(model="m", messages=msgs, max_tokens=6, temperature=0,  # type: ignore[arg-type]
                                        extra_body={"chat_template_kwargs": {"thinking": True}})  # fmt: skip
    off = client.chat.completions.create(model="m", messages=msgs, max_tokens=6, temperature=0,  # type: ignore[arg-type]
                                         extra_body={"chat_template_kwargs": {"thinking": False}})  # fmt: skip
    assert on.usage is not None and off.usage is not None
    details = on.usage.completion_tokens_details
    assert details is not None and 0 < details.reasoning_tokens <= on.usage.completion_tokens
    assert getattr(on.choices[0].message, "reasoning_content", None)
    assert off.usage.completion_tokens_details is not None and off.usage.completion_tokens_details.reasoning_tokens == 0
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=msgs, max_tokens=2,  # type: ignore[arg-type]
                                       extra_body={"chat_template_kwargs": {"add_vision_id": True}})  # fmt: skip
    assert "add_vision_id" in e.value.body["message"]  # type: ignore[index]


def test_cached_tokens_count_prefix_cache_hits(client: openai.OpenAI) -> None:
    prompt = "A long shared system prompt, repeated so it fills several cache blocks. " * 4
    first = client.completions.create(model="m", prompt=prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model="m", prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage is not None and again.usage is not None
    cached = again.usage.prompt_tokens_details
    assert cached is not None and cached.cached_tokens >= 16 and cached.cached_tokens % 16 == 0
    assert cached.cached_tokens < again.usage.prompt_tokens


def test_dsv_eval_client_switches_thinking_both_ways(server: Any) -> None:
    """``dsv eval``'s client sends the switch as DeepSeek and as vLLM read it, and reads the usage
    details back (here from dsv serve, which takes either form). Needs dsv-synth[eval] beside
    dsv-serve: it runs in the whole suite, and skips in ``nox -s serve``."""
    EndpointClient = pytest.importorskip("dsv.synth.eval.client").EndpointClient

    seen: list[dict[str, Any]] = []

    def record(request: httpx.Request) -> None:
        seen.append(__import__("json").loads(request.content))

    c = EndpointClient(server.url + "/v1", "m", api_key="sk-t")
    c._client._client.event_hooks["request"].append(record)  # the SDK's httpx client
    msgs = [{"role": "user", "content": "hi there, a prompt long enough for one cache block"}]
    for thinking in (True, False):
        reply = c.chat(msgs, thinking=thinking, max_tokens=4, temperature=0)
        assert seen[-1]["thinking"] == {"type": "enabled" if thinking else "disabled"}
        assert seen[-1]["chat_template_kwargs"] == {"thinking": thinking}
        assert reply.usage.reasoning_tokens == (4 if thinking else 0)
        assert reply.usage.cached_tokens is not None
    c.close()


def test_vllm_metric_names(server: Any, client: openai.OpenAI) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    prompt = "Metrics: a prompt sent twice so the second is served from the prefix cache. " * 2
    for _ in range(2):
        client.completions.create(model="m", prompt=prompt, max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics").text
    values = {(s.name, s.labels.get("model_name")): s.value
              for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:gpu_cache_usage_perc",
                 "vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds_count",
                 "vllm:inter_token_latency_seconds_count", "vllm:time_per_output_token_seconds_count"):  # fmt: skip
        assert (name, "m") in values, name
    assert values[("vllm:prefix_cache_hits_total", "m")] >= 16
    assert values[("vllm:prefix_cache_queries_total", "m")] > values[("vllm:prefix_cache_hits_total", "m")]
    assert values[("vllm:generation_tokens_total", "m")] >= 6
    assert values[("vllm:time_to_first_token_seconds_count", "m")] >= 2
