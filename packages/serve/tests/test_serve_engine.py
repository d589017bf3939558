"""The native engine: continuous batching, chunked prefill, prefix caching, cancellation, and the
HTTP layer's queue limit, per-request timeout and graceful shutdown; incremental detokenisation.

Engine tests drive :class:`~dsv.serve.engine.Engine` directly on a seeded random ``tiny`` model
with greedy decoding and no stop token, so every run of a prompt has one right answer: the tokens
the same prompt gets when it runs alone. HTTP tests serve the random tiny checkpoint with uvicorn
on 127.0.0.1 (greedy output of that model runs hundreds of tokens without an end-of-sentence).

Run: ``pytest packages/serve/tests/test_serve_engine.py``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv.serve.backend import IncrementalDetokenizer
from dsv.serve.engine import Engine, Finish, GenParams, TokenEvent

GREEDY = GenParams(temperature=0.0, max_tokens=24)


class _Counting(torch.nn.Module):
    """The model, recording the (batch, new tokens) shape of every forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.shapes = model, []

    def forward(self, ids: torch.Tensor, **kw: Any) -> Any:
        self.shapes.append(tuple(ids.shape))
        return self.model(ids, **kw)


class _Run:
    """One submitted request: its tokens, its finish, and an event per milestone."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.finish: Finish | None = None
        self.done = threading.Event()
        self.started = threading.Event()

    def __call__(self, ev: TokenEvent | Finish) -> None:
        if isinstance(ev, Finish):
            self.finish = ev
            self.done.set()
        else:
            self.tokens.append(ev.token)
            if len(self.tokens) >= 4:
                self.started.set()

    def wait(self) -> list[int]:
        assert self.done.wait(60), "request did not finish"
        return self.tokens


@pytest.fixture(scope="module")
def tiny() -> tuple[torch.nn.Module, Any]:
    from dsv.core import presets
    from dsv.core.model import DSVForCausalLM

    torch.manual_seed(0)
    cfg = presets.tiny()
    return DSVForCausalLM(cfg).eval(), cfg


@pytest.fixture
def make_engine(tiny: tuple[torch.nn.Module, Any]) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(start: bool = True, **kw: Any) -> Engine:
        model, cfg = tiny
        e = Engine.for_model(_Counting(model), cfg, **{"num_blocks": 64, "block_size": 8, **kw})
        if start:
            e.start()
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.stop()


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(2, 1000, (n,), generator=g).tolist() for n in (37, 11, 52, 20)]


def _alone(make_engine: Callable[..., Engine], prompt: list[int], params: GenParams = GREEDY) -> list[int]:
    run = _Run()
    make_engine().submit(prompt, params, run)
    return run.wait()


def _wait_idle(engine: Engine, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while (s := engine.stats()).running or s.waiting or s.used_blocks:
        assert time.monotonic() < deadline, f"engine not idle: {s}"
        time.sleep(0.005)


def test_requests_joining_mid_flight_get_their_solo_tokens(make_engine: Callable[..., Engine]) -> None:
    prompts = _prompts()
    solo = [_alone(make_engine, p) for p in prompts]
    engine = make_engine(prefill_chunk=16)
    first = _Run()
    engine.submit(prompts[0], GenParams(temperature=0.0, max_tokens=60), first)
    assert first.started.wait(30)
    late = [_Run() for _ in prompts[1:]]
    for p, run in zip(prompts[1:], late, strict=True):
        engine.submit(p, GREEDY, run)
    assert [r.wait() for r in late] == solo[1:]
    assert first.wait()[:24] == solo[0]
    batched = [s for s in engine.model.shapes if s[1] == 1 and s[0] > 1]
    assert batched, "the late requests were decoded in one batch with the first"
    _wait_idle(engine)


def test_staged_decode_matches_paged_decode_as_rows_pack(make_engine: Callable[..., Engine]) -> None:
    prompts = _prompts()
    lengths = [30, 9, 44, 17]  # requests end at different steps: rows are handed over mid-flight
    params = [GenParams(temperature=0.0, max_tokens=n) for n in lengths]
    paged = make_engine(staging=False)
    want = []
    for p, gp in zip(prompts, params, strict=True):
        paged.submit(p, gp, run := _Run())
        want.append(run.wait())
    engine = make_engine(start=False)
    runs = [_Run() for _ in prompts]
    for p, gp, run in zip(prompts, params, runs, strict=True):
        engine.submit(p, gp, run)
    engine.start()
    assert [r.wait() for r in runs] == want
    assert max(s[0] for s in engine.model.shapes if s[1] == 1) == 4, "all four decoded together"
    _wait_idle(engine)
    assert engine._rows == [], "every staging row was given back"


def test_penalties_follow_core_generate_per_request_and_leave_logprobs_raw(
    make_engine: Callable[..., Engine], tiny: tuple[torch.nn.Module, Any]
) -> None:
    from dsv.core.generate import SamplingParams, generate

    model, _ = tiny
    prompts = _prompts()
    pen = {"presence_penalty": 0.4, "frequency_penalty": 0.3}
    want = generate(model, prompts[0], SamplingParams(temperature=0, max_new_tokens=24, **pen)).tokens
    plain = generate(model, prompts[0], SamplingParams(temperature=0, max_new_tokens=24)).tokens
    assert want != plain, "the penalties change this greedy continuation"
    neighbour = _alone(make_engine, prompts[1])
    engine = make_engine(start=False)
    events: list[TokenEvent] = []
    penalised, other = _Run(), _Run()

    def record(ev: TokenEvent | Finish) -> None:
        if isinstance(ev, TokenEvent):
            events.append(ev)
        penalised(ev)

    engine.submit(prompts[0], GenParams(temperature=0.0, max_tokens=24, **pen), record)
    engine.submit(prompts[1], GREEDY, other)
    engine.start()
    assert penalised.wait() == want
    assert other.wait() == neighbour, "a request without penalties beside it is unaffected"
    # Reported logprobs are the model's own (before the penalties), as the module documents.
    with torch.no_grad():
        logits = model(torch.tensor([prompts[0] + want])).logits[0, len(prompts[0]) - 1 : -1]
    raw = logits.log_softmax(-1).gather(1, torch.tensor(want)[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor([e.logprob for e in events]), raw, atol=1e-4, rtol=0)
    _wait_idle(engine)


def test_logit_bias_bans_and_forces_tokens_per_request(make_engine: Callable[..., Engine]) -> None:
    prompts = _prompts()
    plain = _alone(make_engine, prompts[0])
    engine = make_engine(start=False)
    banned, forced, neighbour = _Run(), _Run(), _Run()
    engine.submit(
        prompts[0], GenParams(temperature=0.0, max_tokens=24, logit_bias=((plain[0], -100.0),)), banned
    )
    engine.submit(
        prompts[0], GenParams(temperature=0.8, seed=1, max_tokens=24, logit_bias=((7, 100.0),)), forced
    )
    engine.submit(prompts[0], GREEDY, neighbour)
    engine.start()
    assert plain[0] not in banned.wait() and banned.tokens != plain
    assert forced.wait() == [7] * 24, "+100 outweighs every other logit, sampled or not"
    assert neighbour.wait() == plain
    _wait_idle(engine)


def test_prefix_choices_constrain_the_start_of_the_output(make_engine: Callable[..., Engine]) -> None:
    prompts = _prompts()
    plain = _alone(make_engine, prompts[0])
    a, b, c = [t for t in range(10, 20) if t not in plain[:3]][:3]
    off_path = ((a, b, c), (a, c), (b,))  # none starts the way the model would
    engine = make_engine(start=False)
    runs = {
        name: _Run() for name in ("on_path", "greedy", "biased", *(f"seed{i}" for i in range(4)), "neighbour")
    }
    on_path = ((plain[0], plain[1]), (a,))
    engine.submit(
        prompts[0], GenParams(temperature=0.0, max_tokens=24, prefix_choices=on_path), runs["on_path"]
    )
    engine.submit(
        prompts[0], GenParams(temperature=0.0, max_tokens=24, prefix_choices=off_path), runs["greedy"]
    )
    # +100 on token 7 forces it everywhere else; the constraint still holds first.
    biased = GenParams(
        temperature=0.8, seed=1, max_tokens=8, logit_bias=((7, 100.0),), prefix_choices=((a, b),)
    )
    engine.submit(prompts[0], biased, runs["biased"])
    for i in range(4):
        params = GenParams(temperature=1.5, seed=i, max_tokens=6, prefix_choices=off_path)
        engine.submit(prompts[0], params, runs[f"seed{i}"])
    engine.submit(prompts[0], GREEDY, runs["neighbour"])
    engine.start()
    assert runs["on_path"].wait() == plain, "a constraint the model already follows changes nothing"
    for name in ("greedy", *(f"seed{i}" for i in range(4))):
        out = runs[name].wait()
        assert any(tuple(out[: len(ch)]) == ch for ch in off_path), (name, out)
    assert runs["biased"].wait() == [a, b, 7, 7, 7, 7, 7, 7]
    assert runs["neighbour"].wait() == plain
    _wait_idle(engine)


def test_prefix_choices_after_a_trigger(make_engine: Callable[..., Engine]) -> None:
    prompts = _prompts()
    # +100 makes token 7 the output everywhere the constraint allows it: before the trigger (7, 7)
    # and after the choice is complete.
    forced_sevens = {"temperature": 0.0, "max_tokens": 8, "logit_bias": ((7, 100.0),)}
    engine = make_engine(start=False)
    once, twice = _Run(), _Run()
    engine.submit(prompts[0], GenParams(**forced_sevens, prefix_choices=((11, 12),), prefix_after=(7,)), once)
    engine.submit(
        prompts[0], GenParams(**forced_sevens, prefix_choices=((11, 12),), prefix_after=(7, 7)), twice
    )
    engine.start()
    assert once.wait() == [7, 11, 12, 7, 7, 7, 7, 7]
    assert twice.wait() == [7, 7, 11, 12, 7, 7, 7, 7]
    _wait_idle(engine)


def test_each_request_samples_with_a_generator_on_the_engine_device(
    make_engine: Callable[..., Engine],
) -> None:
    # A CPU generator cannot draw from CUDA logits: every sampled request would fail on a GPU.
    engine = make_engine(start=False)
    engine.submit([5, 6, 7], GenParams(temperature=0.7, seed=3), _Run())
    assert engine._waiting[0].generator.device == engine.device


@pytest.mark.parametrize(
    "rule", [{"top_p": 0.5}, {"top_k": 3}, {"top_k": 6, "top_p": 0.7}], ids=["top_p", "top_k", "both"]
)
def test_sampled_tokens_stay_in_the_top_p_top_k_set_and_match_core(
    make_engine: Callable[..., Engine], tiny: tuple[torch.nn.Module, Any], rule: dict[str, Any]
) -> None:
    """Over many seeds, every token the engine samples lies in core's kept set for its step, and is
    the token ``sample_next`` draws from the same logits with a generator seeded alike: the engine
    applies each request's own top-p and top-k, not just its temperature."""
    from dsv.core.generate import SamplingParams, kept_token_mask, sample_next

    model, _ = tiny
    prompt = _prompts()[1]
    seeds, steps, temperature = range(12), 4, 1.5
    engine = make_engine(start=False)
    runs = {s: _Run() for s in seeds}
    for s in seeds:
        engine.submit(prompt, GenParams(temperature=temperature, seed=s, max_tokens=steps, **rule), runs[s])
    engine.start()
    sp = SamplingParams(temperature=temperature, max_new_tokens=1, **rule)
    outside_free = 0  # tokens that unfiltered sampling would have drawn outside the kept set
    for s in seeds:
        got = runs[s].wait()
        assert len(got) == steps
        g = torch.Generator().manual_seed(s)
        free = torch.Generator().manual_seed(s)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + got])).logits[0, len(prompt) - 1 : -1]
        for t in range(steps):
            row = logits[t : t + 1]
            keep = kept_token_mask(row, sp)[0]
            assert keep.sum() < keep.numel() // 2, "the rule removes most of the vocabulary here"
            assert keep[got[t]], f"seed {s} step {t}: token {got[t]} is outside the {rule} set"
            assert int(sample_next(row, sp, g).tokens[0]) == got[t], f"seed {s} step {t}"
            unfiltered = SamplingParams(temperature=temperature, max_new_tokens=1)
            outside_free += int(not keep[int(sample_next(row, unfiltered, free).tokens[0])])
    # The check has teeth: the same draws without the rule leave the set.
    assert outside_free >= len(seeds)
    _wait_idle(engine)


def test_prefix_choices_allowed_next() -> None:
    p = GenParams(prefix_choices=((1, 2, 3), (1, 4), (5,)))
    assert [p.allowed_next(g) for g in ([], [1], [1, 2], [1, 2, 3], [5], [5, 9], [1, 4, 0])] == [
        {1, 5},
        {2, 4},
        {3},
        None,
        None,
        None,
        None,
    ]
    assert GenParams().allowed_next([]) is None


def test_a_tiny_temperature_neither_fails_nor_harms_its_batch(make_engine: Callable[..., Engine]) -> None:
    # 1e-300 is 0 in fp32: dividing the logits by it used to give nan and fail the whole step.
    prompts = _prompts()
    want = [_alone(make_engine, p) for p in prompts[:2]]
    engine = make_engine(start=False)
    cold, neighbour = _Run(), _Run()
    engine.submit(prompts[0], GenParams(temperature=1e-300, seed=3, max_tokens=24), cold)
    engine.submit(prompts[1], GREEDY, neighbour)
    engine.start()
    assert [cold.wait(), neighbour.wait()] == want, "the greedy limit, and the neighbour untouched"
    assert cold.finish is not None and cold.finish.reason == "length"
    _wait_idle(engine)


def test_a_request_whose_sampling_fails_ends_alone(
    make_engine: Callable[..., Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    import dsv.core.generate as gen

    prompts = _prompts()
    sampled = GenParams(temperature=0.9, seed=5, max_tokens=24)
    want = [_alone(make_engine, prompts[1], sampled), _alone(make_engine, prompts[2])]
    real = gen.sample_next

    def failing_at_half(logits: torch.Tensor, params: Any, generator: Any = None) -> Any:
        if params.temperature == 0.5:  # stands in for a failure no valid request can cause
            raise RuntimeError("boom")
        return real(logits, params, generator)

    monkeypatch.setattr(gen, "sample_next", failing_at_half)
    engine = make_engine(start=False)
    bad, others = _Run(), [_Run(), _Run()]
    engine.submit(prompts[0], GenParams(temperature=0.5, max_tokens=24), bad)
    engine.submit(prompts[1], sampled, others[0])
    engine.submit(prompts[2], GREEDY, others[1])
    engine.start()
    bad.wait()
    assert bad.finish is not None and bad.finish.reason == "error" and "boom" in bad.finish.error
    assert [r.wait() for r in others] == want
    _wait_idle(engine)


def test_prompt_ids_outside_the_vocabulary_are_refused(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(start=False)
    for prompt in ([5, engine.vocab_size], [-1, 5]):
        with pytest.raises(ValueError, match="out of range"):
            engine.submit(prompt, GREEDY, _Run())
    with pytest.raises(ValueError, match="prefix_choices token id"):
        engine.submit([5], GenParams(prefix_choices=((3, engine.vocab_size),)), _Run())


def test_invalid_sampling_settings_are_refused_when_built() -> None:
    for bad in ({"top_p": 0.0}, {"temperature": -1.0}, {"max_tokens": 0}, {"presence_penalty": 3.0},
                {"logit_bias": ((5, 500.0),)}, {"top_logprobs": -1}, {"prefix_choices": ((),)},
                {"prefix_choices": ((3, -1),)}, {"prefix_after": (5,)}):  # fmt: skip
        with pytest.raises(ValueError):
            GenParams(**bad)


def test_same_length_prompts_prefill_in_one_forward(make_engine: Callable[..., Engine]) -> None:
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, 1000, (20,), generator=g).tolist() for _ in range(3)]
    solo = [_alone(make_engine, p) for p in prompts]
    engine = make_engine(start=False, num_blocks=64)
    runs = [_Run() for _ in prompts]
    for p, run in zip(prompts, runs, strict=True):
        engine.submit(p, GREEDY, run)
    engine.start()
    assert [r.wait() for r in runs] == solo
    assert engine.model.shapes[0] == (3, 20) and all(s[1] == 1 for s in engine.model.shapes[1:])
    _wait_idle(engine)


def test_chunked_prefill_interleaves_and_matches(make_engine: Callable[..., Engine]) -> None:
    prompts = _prompts()
    whole = _alone(make_engine, prompts[2])
    engine = make_engine(prefill_chunk=5)
    decoding = _Run()
    did = engine.submit(prompts[1], GenParams(temperature=0.0, max_tokens=200), decoding)
    assert decoding.started.wait(30)
    seen = len(engine.model.shapes)
    long = _Run()
    engine.submit(prompts[2], GREEDY, long)
    assert long.wait() == whole
    shapes = engine.model.shapes[seen:]
    prefill = [i for i, s in enumerate(shapes) if s[1] > 1]
    assert [shapes[i] for i in prefill] == [(1, 5)] * 10 + [(1, 2)], (
        "the 52-token prompt went in 5-token chunks"
    )
    between = [s for s in shapes[prefill[0] : prefill[-1]] if s[1] == 1]
    assert len(between) >= len(prefill) - 1, "decoding went on between the prefill chunks"
    engine.cancel(did)
    _wait_idle(engine)


def test_prefix_cache_reuses_blocks(make_engine: Callable[..., Engine]) -> None:
    base = _prompts()[2]  # 52 tokens: 6 full blocks of 8
    other = [*base[:40], 7, 8, 9, 10, 11]
    expected = _alone(make_engine, other)
    engine = make_engine()
    engine.submit(base, GREEDY, first := _Run())
    first.wait()
    _wait_idle(engine)
    assert engine.stats().cached_blocks >= 6
    hits, seen = engine.stats().prefix_hit_blocks, len(engine.model.shapes)
    engine.submit(other, GREEDY, second := _Run())
    assert second.wait() == expected, "reused cache rows give the same tokens as a fresh prefill"
    assert engine.stats().prefix_hit_blocks - hits == 5  # blocks 0..4 cover its first 40 tokens
    prefilled = sum(s[1] for s in engine.model.shapes[seen:] if s[1] > 1)
    assert prefilled == len(other) - 40, "only the uncached tail was prefilled"
    _wait_idle(engine)


def test_identical_prompts_arriving_together_prefill_once(make_engine: Callable[..., Engine]) -> None:
    # n > 1 choices of one request, or one system prompt many clients send at once: the followers
    # wait for the first one's prefill and take its blocks from the prefix cache.
    base, other = _prompts()[2], _prompts()[1]  # 52 tokens (6 reusable blocks of 8), and 11
    want = _alone(make_engine, base)
    engine = make_engine(start=False)
    runs = [_Run() for _ in range(4)]
    for run in runs[:3]:
        engine.submit(base, GREEDY, run)
    engine.submit(other, GREEDY, runs[3])  # queued behind the followers, not held up by them
    engine.start()
    assert [r.wait() for r in runs[:3]] == [want] * 3
    runs[3].wait()
    assert engine.stats().prefix_hit_blocks == 2 * 6
    prefilled = sum(s[0] * s[1] for s in engine.model.shapes if s[1] > 1)
    assert prefilled == len(base) + 2 * (len(base) - 48) + len(other), engine.model.shapes
    _wait_idle(engine)
    # Without sharing every copy is prefilled in full, with the same tokens.
    alone = make_engine(start=False, share_prefill=False)
    copies = [_Run() for _ in range(3)]
    for run in copies:
        alone.submit(base, GREEDY, run)
    alone.start()
    assert [r.wait() for r in copies] == [want] * 3
    assert alone.stats().prefix_hit_blocks == 0
    assert sum(s[0] * s[1] for s in alone.model.shapes if s[1] > 1) == 3 * len(base)


def test_cancel_frees_blocks_at_once(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(max_batch=1)
    running, queued = _Run(), _Run()
    rid = engine.submit(_prompts()[0], GenParams(temperature=0.0, max_tokens=400), running)
    qid = engine.submit(_prompts()[1], GenParams(temperature=0.0, max_tokens=400), queued)
    assert running.started.wait(30)
    assert engine.stats().used_blocks > 0 and engine.stats().waiting == 1
    engine.cancel(qid)
    engine.cancel(rid)
    _wait_idle(engine)
    n = len(running.tokens)
    # A request run to its end after the cancels takes many engine steps: had the cancelled ones
    # stayed scheduled, they would have been given tokens in those steps.
    after = _Run()
    engine.submit(_prompts()[2], GenParams(temperature=0.0, max_tokens=8), after)
    assert len(after.wait()) == 8
    assert len(running.tokens) == n and running.finish is None and queued.tokens == []


def test_shutdown_ends_running_requests(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine()
    run = _Run()
    engine.submit(_prompts()[0], GenParams(temperature=0.0, max_tokens=400), run)
    assert run.started.wait(30)
    engine.stop()
    assert run.done.is_set() and run.finish is not None and run.finish.reason == "error"
    assert "shutting down" in run.finish.error


# --------------------------------------------------------------------------- detokenisation
@pytest.fixture(scope="module")
def multibyte_tok() -> Any:
    from dsv.core.tokenizer import default_corpus, train_bpe

    extra = ["héllo wörld ça va déjà", "日本語のテキストです。", "emoji 🙂🚀 mixed ünïcödé", "Привет мир"]
    return train_bpe(default_corpus(300) + extra * 3, 512)


class _DecodeLog:
    def __init__(self, tok: Any) -> None:
        self.tok, self.lengths = tok, []

    def decode(self, ids: list[int]) -> str:
        self.lengths.append(len(ids))
        return self.tok.decode(ids)


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80))
def test_streamed_text_equals_one_shot_decode(multibyte_tok: Any, text: str) -> None:
    ids = multibyte_tok.encode(text)
    detok = IncrementalDetokenizer(multibyte_tok)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == multibyte_tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces[:-1]) or "\ufffd" in text


def test_detokenizer_window_stays_small(multibyte_tok: Any) -> None:
    text = "日本語 déjà vu 🙂 " * 40
    ids = multibyte_tok.encode(text)
    log = _DecodeLog(multibyte_tok)
    detok = IncrementalDetokenizer(log)
    out = "".join(detok.push(i) for i in ids) + detok.flush()
    assert out == text and len(ids) > 200
    assert max(log.lengths) <= 8, "each step decodes a few tokens, not the whole output"


# --------------------------------------------------------------------------- HTTP: limits
@pytest.fixture
def serve_tiny(tiny_ckpt: Path, live_server: Any) -> Iterator[Callable[..., Any]]:
    from dsv.serve import load_native_app

    servers: list[Any] = []

    def start(**settings: Any) -> Any:
        app = load_native_app(str(tiny_ckpt), model_name="m", max_model_len=1024, num_blocks=256, **settings)
        server = live_server(app).__enter__()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.__exit__(None, None, None)


def _body(max_tokens: int, stream: bool) -> dict[str, Any]:
    return {"model": "m", "prompt": "hello", "max_tokens": max_tokens, "temperature": 0, "stream": stream}


def _read_stream(resp: httpx.Response) -> tuple[list[dict[str, Any]], bool]:
    chunks, done = [], False
    for line in resp.iter_lines():
        if line.startswith("data: "):
            if line == "data: [DONE]":
                done = True
            else:
                chunks.append(json.loads(line[6:]))
    return chunks, done


def test_a_request_the_engine_refuses_ends_cleanly(
    serve_tiny: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The HTTP layer refuses what it can first; anything the engine still refuses at submit ends the
    # choice with an error (a 503 body, or an error event and [DONE]), never a 500 or a cut stream.
    def refuse(self: Engine, *args: Any) -> int:
        raise ValueError("request needs more cache blocks than the pool holds")

    monkeypatch.setattr(Engine, "submit", refuse)
    server = serve_tiny(engine_process=False)
    url = server.url + "/v1/completions"
    with httpx.Client(timeout=60) as c:
        r = c.post(url, json=_body(4, stream=False))
        assert r.status_code == 503 and "cache blocks" in r.json()["error"]["message"]
        with c.stream("POST", url, json=_body(4, stream=True)) as resp:
            chunks, done = _read_stream(resp)
    assert done and any("cache blocks" in json.dumps(ch.get("error", "")) for ch in chunks), chunks


def test_status_lines_while_busy(
    serve_tiny: Callable[..., Any], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    from dsv.serve.metrics import Metrics

    # The reporter reads Metrics.totals once per tick: counting the calls tells how many ticks
    # passed, so "no line while idle" is checked over ticks that really ran, however slow the host.
    ticks = [0]
    real_totals = Metrics.totals

    def counted(self: Metrics) -> dict[str, float]:
        ticks[0] += 1
        return real_totals(self)

    monkeypatch.setattr(Metrics, "totals", counted)

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "dsv.serve"]

    def wait_ticks(n: int) -> None:
        target, deadline = ticks[0] + n, time.monotonic() + 60
        while ticks[0] < target:
            assert time.monotonic() < deadline, "the status reporter stopped ticking"
            time.sleep(0.01)

    caplog.set_level(logging.INFO, logger="dsv.serve")
    server = serve_tiny(stats_interval_s=0.1)
    with httpx.Client(timeout=60) as c:
        assert c.post(server.url + "/v1/completions", json=_body(48, stream=False)).status_code == 200
    wait_ticks(3)  # the tick that saw the last tokens has logged them; later ones saw nothing new
    assert any("output" in m and "tok/s" in m and "cache" in m for m in lines()), lines()
    rates = [float(m.split("output ")[1].split(" tok/s")[0].replace(",", "")) for m in lines()]
    assert max(rates) > 0, lines()
    quiet = len(lines())
    wait_ticks(5)
    assert len(lines()) == quiet, "no status line while idle"


def test_a_slow_stats_call_does_not_stall_streams(
    serve_tiny: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine process answers stats() over a pipe; /health and /metrics must wait for it off the
    # event loop that writes every stream's tokens.
    from dsv.serve.backend import LocalBackend

    real = LocalBackend.stats
    # A stats call started mid-stream is held until the stream has moved on by 30 chunks: if it
    # held the event loop the stream could never move, and the wait ends at its deadline instead.
    released = threading.Event()
    held: list[bool] = []
    probes: list[threading.Thread] = []

    def slow(self: LocalBackend) -> dict[str, float]:
        if probes:
            held.append(released.wait(60))
        return real(self)

    monkeypatch.setattr(LocalBackend, "stats", slow)
    server = serve_tiny(engine_process=False)
    arrivals = 0
    try:
        with (
            httpx.Client(timeout=120) as c,
            c.stream("POST", server.url + "/v1/completions", json=_body(400, True)) as r,
        ):
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    arrivals += 1
                    if arrivals == 20:  # the stream is flowing: now ask for the stats, twice
                        for path in ("/health", "/metrics"):
                            t = threading.Thread(
                                target=httpx.get, args=(server.url + path,), kwargs={"timeout": 120}
                            )
                            probes.append(t)
                            t.start()
                    elif arrivals == 50:
                        released.set()
    finally:
        released.set()
    for t in probes:
        t.join()
    assert arrivals > 100 and held == [True, True], (arrivals, held)


def test_queue_full_is_429_with_retry_after(serve_tiny: Callable[..., Any]) -> None:
    server = serve_tiny(max_in_flight=2)
    url = server.url + "/v1/completions"
    with httpx.Client(timeout=60) as c:
        with (
            c.stream("POST", url, json=_body(200, True)) as a,
            c.stream("POST", url, json=_body(200, True)) as b,
        ):
            assert a.status_code == b.status_code == 200
            r = httpx.post(url, json=_body(4, False), timeout=30)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
            for resp in (a, b):
                chunks, done = _read_stream(resp)
                assert done and chunks[-1]["choices"][0]["finish_reason"] == "length"
        r = httpx.post(url, json=_body(4, False), timeout=30)
        assert r.status_code == 200, "room again once the two streams ended"


def test_request_timeout(serve_tiny: Callable[..., Any]) -> None:
    server = serve_tiny(request_timeout_s=0.4)
    url = server.url + "/v1/completions"
    r = httpx.post(url, json=_body(600, False), timeout=60)
    assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
    with httpx.stream("POST", url, json=_body(600, True), timeout=60) as resp:
        chunks, done = _read_stream(resp)
    assert done and any("error" in c and c["error"]["code"] == "request_timeout" for c in chunks)
    deadline = time.monotonic() + 60
    while httpx.get(server.url + "/health", timeout=30).json()["used_blocks"]:
        assert time.monotonic() < deadline, "timed-out requests gave their cache blocks back"
        time.sleep(0.02)


def test_graceful_shutdown_finishes_streams(tiny_ckpt: Path, live_server: Any) -> None:
    from dsv.serve import load_native_app

    app = load_native_app(str(tiny_ckpt), model_name="m", max_model_len=1024, num_blocks=256)
    server = live_server(app).__enter__()
    url = server.url + "/v1/completions"
    with httpx.stream("POST", url, json=_body(120, True), timeout=60) as resp:
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        server.server.should_exit = True  # what SIGTERM/SIGINT do in uvicorn
        rest = [line for line in lines if line.startswith("data: ")]
    chunks = [json.loads(x[6:]) for x in [first, *rest[:-1]]]
    assert rest[-1] == "data: [DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for c in chunks if c["choices"][0]["text"] or c["choices"][0]["finish_reason"]) >= 2
    server.thread.join(timeout=30)
    assert not server.thread.is_alive()
    assert not app.state.backend.engine.alive  # the engine process ended with the server
    with pytest.raises(httpx.ConnectError):
        httpx.post(url, json=_body(4, False), timeout=5)


def test_penalties_and_logit_bias_through_the_openai_client(
    serve_tiny: Callable[..., Any], tiny_ckpt: Path
) -> None:
    import openai

    from dsv.core.checkpoint import load_pretrained
    from dsv.core.generate import SamplingParams, generate

    model, tok = load_pretrained(tiny_ckpt)
    prompt = torch.randint(2, 1000, (40,), generator=torch.Generator().manual_seed(3)).tolist()
    pen = {"presence_penalty": 0.4, "frequency_penalty": 0.3}

    def reference(**kw: float) -> str:
        p = SamplingParams(temperature=0, max_new_tokens=24, stop_token_ids=(tok.eos_id,), **kw)
        return tok.decode([t for t in generate(model.eval(), prompt, p).tokens if t != tok.eos_id])

    want, plain = reference(**pen), reference()
    assert want != plain, "the penalties change this greedy continuation"
    client = openai.OpenAI(base_url=serve_tiny().url + "/v1", api_key="none", max_retries=0)
    out = client.completions.create(model="m", prompt=prompt, max_tokens=24, temperature=0, **pen)
    assert out.choices[0].text == want
    forced = client.completions.create(
        model="m", prompt=prompt, max_tokens=6, temperature=0, logit_bias={"300": 100}
    )
    assert forced.choices[0].text == tok.decode([300] * 6)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt=prompt, max_tokens=4, logit_bias={"5000": 1})
    assert e.value.body["param"] == "logit_bias" and "5000" in e.value.body["message"]
    assert (
        client.completions.create(model="m", prompt=prompt, max_tokens=24, temperature=0).choices[0].text
        == plain
    )
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="m", prompt=prompt, max_tokens=4, presence_penalty=2.5)
    assert "presence_penalty" in str(e.value)


def test_echo_puts_the_prompt_before_the_completion(serve_tiny: Callable[..., Any], tiny_ckpt: Path) -> None:
    import openai

    from dsv.core.tokenizer import Tokenizer

    tok = Tokenizer.load(tiny_ckpt)
    client = openai.OpenAI(base_url=serve_tiny().url + "/v1", api_key="none", max_retries=0)
    ids = tok.encode("the weather in Paris", add_bos=False)
    for prompt, text in ((ids, tok.decode(ids)), ("a plain text prompt", "a plain text prompt")):
        kw: dict[str, Any] = {"model": "m", "prompt": prompt, "max_tokens": 5, "temperature": 0}
        plain = client.completions.create(**kw).choices[0].text
        echoed = client.completions.create(echo=True, **kw).choices[0].text
        streamed = "".join(c.choices[0].text for c in client.completions.create(echo=True, stream=True, **kw))
        assert echoed == streamed == text + plain
