"""What RL rollouts take from the engine: the sampling record (Keep Sampling Mask), the MoE routes
(Keep Routing), new weights without a restart, and the blocking ``generate_many``.

Every check replays a rollout through a plain forward of the same seeded random ``tiny`` model
(fp32, CPU) over ``prompt + tokens``, as a training step would: the recorded per-token logprobs and
kept sets must follow :func:`dsv.core.generate.sample_next`'s rule on those logits, and the
recorded routes must be the ones that forward takes and, forced, reproduce its logits.

Run: ``pytest packages/serve/tests/test_serve_engine_rl.py``.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from dsv.serve.engine import Completion, Engine, GenParams

MAX_TOKENS = 12


class _Recording(torch.nn.Module):
    """The model, recording per forward its (batch, new tokens) shape and whether routes were asked."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls: list[tuple[tuple[int, int], bool]] = []

    def forward(self, ids: torch.Tensor, **kw: Any) -> Any:
        self.calls.append((tuple(ids.shape), bool(kw.get("return_routes"))))
        return self.model(ids, **kw)


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

    def make(model: torch.nn.Module | None = None, start: bool = True, **kw: Any) -> Engine:
        base, cfg = tiny
        e = Engine.for_model(
            model if model is not None else base, cfg, **{"num_blocks": 64, "block_size": 8, **kw}
        )
        if start:
            e.start()
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.stop()


def _prompt(n: int, seed: int = 1) -> list[int]:
    return torch.randint(2, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _replay_logits(model: torch.nn.Module, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The logits a training forward gives for each generated token: ``[C, V]``."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]), logits_to_keep=0).logits[0]
    return logits[len(prompt) - 1 : -1]


SAMPLING = {
    "greedy": GenParams(temperature=0.0, max_tokens=MAX_TOKENS, record=True),
    "temperature": GenParams(temperature=0.8, seed=3, max_tokens=MAX_TOKENS, record=True),
    "top_k": GenParams(temperature=0.9, top_k=20, seed=4, max_tokens=MAX_TOKENS, record=True),
    "top_p": GenParams(temperature=1.1, top_p=0.3, seed=5, max_tokens=MAX_TOKENS, record=True),
}


def test_recorded_sampling_follows_sample_next_on_a_training_forward(
    make_engine: Callable[..., Engine], tiny: tuple[torch.nn.Module, Any]
) -> None:
    from dsv.core.generate import SamplingParams, kept_token_mask

    model, _ = tiny
    prompts = [_prompt(n, seed) for seed, n in enumerate((21, 9, 30, 14))]
    # One batch: the four rows sample side by side, each by its own rule.
    outs = make_engine().generate_many(prompts, list(SAMPLING.values()))
    for (name, gp), prompt, out in zip(SAMPLING.items(), prompts, outs, strict=True):
        assert out.finish_reason == "length" and len(out.tokens) == MAX_TOKENS, name
        assert out.sample_logprobs is not None and out.kept is not None
        logits = _replay_logits(model, prompt, out.tokens)
        sp = SamplingParams(temperature=gp.temperature, top_p=gp.top_p, top_k=gp.top_k)
        masks = kept_token_mask(logits, sp)
        for t, token in enumerate(out.tokens):
            kept = out.kept[t]
            if name == "temperature":
                assert kept is None, "temperature alone keeps every token"
                assert bool(masks[t].all())
            else:
                assert kept is not None and kept.dtype == torch.long and kept.device.type == "cpu"
                assert kept.tolist() == masks[t].nonzero().squeeze(1).tolist(), (name, t)
                assert not torch.is_inference(kept), "usable under autograd"
            if name == "greedy":
                assert out.sample_logprobs[t] == 0.0 and kept.tolist() == [token]  # type: ignore[union-attr]
                continue
            # sample_next's rule: temperature, renormalised over the kept set.
            want = (logits[t] / gp.temperature).masked_fill(~masks[t], float("-inf")).log_softmax(-1)[token]
            assert out.sample_logprobs[t] == pytest.approx(float(want), abs=1e-4), (name, t)
        # The model's own logprobs are untouched by the record.
        raw = logits.log_softmax(-1).gather(1, torch.tensor(out.tokens)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(out.logprobs), raw, atol=1e-4, rtol=0)
    # top-p 0.3 over a random model's flat distribution keeps few tokens, top-k exactly 20.
    assert all(len(k) == 20 for k in outs[2].kept)  # type: ignore[arg-type, union-attr]
    assert max(len(k) for k in outs[3].kept) < 1024  # type: ignore[arg-type, union-attr]


def test_the_kept_set_of_a_constrained_row_is_what_the_constraint_allows(
    make_engine: Callable[..., Engine],
) -> None:
    choices = ((11, 12, 13), (11, 14), (15,))
    gp = GenParams(temperature=1.0, seed=2, max_tokens=4, prefix_choices=choices, record=True)
    (out,) = make_engine().generate_many([_prompt(10)], gp)
    assert out.kept is not None
    assert out.kept[0].tolist() == [11, 15]  # type: ignore[union-attr]
    if out.tokens[0] == 11:
        assert out.kept[1].tolist() == [12, 14]  # type: ignore[union-attr]


def _check_routes(model: torch.nn.Module, cfg: Any, prompt: list[int], out: Completion) -> None:
    """``out.routes`` are the routes of a training forward over ``prompt + tokens[:-1]``, and
    forcing them reproduces that forward's logits (and the engine's logprobs)."""
    assert out.routes is not None and len(out.routes) == cfg.num_hidden_layers
    x = torch.tensor([prompt + out.tokens[:-1]])
    with torch.no_grad():
        free = model(x, return_routes=True)
    assert free.routes is not None
    for layer, (got, want) in enumerate(zip(out.routes, free.routes, strict=True)):
        if want is None:
            assert got is None, f"layer {layer} is dense"
            continue
        assert got is not None and got.dtype == torch.long and got.device.type == "cpu"
        assert got.shape == (len(prompt) + len(out.tokens) - 1, cfg.num_experts_per_tok)
        # Exact, order included (the gate's top-k order): no slack for near-ties, which would mean
        # the cached forward computed something else than the training forward.
        assert torch.equal(got, want[0]), f"layer {layer} routes differ"
    forced = [None if r is None else r[None] for r in out.routes]
    with torch.no_grad():
        replay = model(x, forced_routes=forced)
    torch.testing.assert_close(replay.logits, free.logits, atol=0, rtol=0)
    raw = replay.logits[0, len(prompt) - 1 :].log_softmax(-1)
    raw = raw.gather(1, torch.tensor(out.tokens)[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(out.logprobs), raw, atol=1e-4, rtol=0)


@pytest.mark.parametrize("staging", [True, False], ids=["staged-decode", "paged-decode"])
def test_routes_cover_prompt_and_output_with_shared_prefill_and_prefix_cache(
    make_engine: Callable[..., Engine], tiny: tuple[torch.nn.Module, Any], staging: bool
) -> None:
    model, cfg = tiny
    counting = _Recording(model)
    # 45 tokens: more than one 8-token block and than a 16-token prefill chunk.
    engine = make_engine(counting, prefill_chunk=16, staging=staging)
    prompt = _prompt(45)
    group = [GenParams(temperature=1.0, seed=10 + i, max_tokens=MAX_TOKENS, record=True) for i in range(4)]
    outs = engine.generate_many([prompt] * 4, group)
    assert len({tuple(o.tokens) for o in outs}) > 1, "the samples differ"
    prompt_rows = sum(b * s for (b, s), _ in counting.calls if s > 1)
    assert prompt_rows < 2 * len(prompt), "the four samples shared one prefill"
    for out in outs:
        _check_routes(model, cfg, prompt, out)
    # The same prompt again: its blocks come from the prefix cache, with their routes.
    hits = engine.stats().prefix_hit_blocks
    (again,) = engine.generate_many([prompt], group[0])
    assert engine.stats().prefix_hit_blocks - hits == (len(prompt) - 1) // 8
    assert again.tokens == outs[0].tokens
    _check_routes(model, cfg, prompt, again)
    # A prompt cached by a request that recorded nothing: a recording request computes its routes.
    other = _prompt(29, seed=7)
    engine.generate_many([other], GenParams(temperature=0.0, max_tokens=3))
    plain, recorded = engine.generate_many([other] * 2, [GenParams(temperature=0.0, max_tokens=5),
                                                         GenParams(temperature=0.0, max_tokens=5, record=True)])  # fmt: skip
    assert plain.routes is None and plain.kept is None and plain.sample_logprobs is None
    _check_routes(model, cfg, other, recorded)


def test_recorded_routes_train_under_autograd(
    make_engine: Callable[..., Engine], tiny: tuple[torch.nn.Module, Any]
) -> None:
    model, cfg = tiny
    prompt = _prompt(12)
    # 70 decode steps: past the point where the engine merges a sequence's per-step routes.
    (out,) = make_engine().generate_many([prompt], GenParams(temperature=0.0, max_tokens=70, record=True))
    assert out.routes is not None
    _check_routes(model, cfg, prompt, out)
    train = copy.deepcopy(model)
    forced = [None if r is None else r[None] for r in out.routes]
    loss = train(torch.tensor([prompt + out.tokens[:-1]]), forced_routes=forced).logits.logsumexp(-1).mean()
    loss.backward()  # inference-mode tensors here would raise: they cannot be saved for backward
    assert train.lm_head.weight.grad is not None


def test_routes_are_asked_for_only_in_forwards_that_record(
    make_engine: Callable[..., Engine], tiny: tuple[torch.nn.Module, Any]
) -> None:
    counting = _Recording(tiny[0])
    engine = make_engine(counting)
    engine.generate_many([_prompt(20), _prompt(13, seed=2)], GenParams(temperature=0.7, seed=1, max_tokens=6))
    assert counting.calls and not any(asked for _, asked in counting.calls)
    counting.calls.clear()
    engine.generate_many([_prompt(20)], GenParams(temperature=0.0, max_tokens=6, record=True))
    assert all(asked for _, asked in counting.calls)


def test_generate_many_with_and_without_the_engine_thread(make_engine: Callable[..., Engine]) -> None:
    prompts = [_prompt(17), _prompt(26, seed=3)]
    params = GenParams(temperature=0.9, top_k=50, seed=8, max_tokens=8, record=True)
    threaded = make_engine().generate_many(prompts, params)
    direct = make_engine(start=False).generate_many(prompts, params)
    for a, b in zip(threaded, direct, strict=True):
        assert a.tokens == b.tokens and a.finish_reason == b.finish_reason == "length"
        assert a.prompt_tokens == b.prompt_tokens and a.error == b.error == ""
        assert a.sample_logprobs == pytest.approx(b.sample_logprobs, abs=1e-5)
    with pytest.raises(ValueError, match="2 prompts but 1 GenParams"):
        make_engine(start=False).generate_many(prompts, [params])


def _changed(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """New values for the LM head and one routed expert of the MoE layer."""
    sd = model.state_dict()
    expert = "model.layers.1.mlp.experts.3.down_proj.weight"
    return {"lm_head.weight": sd["lm_head.weight"] * 1.5 + 0.02, expert: sd[expert] * 4.0}


def _fresh(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    new = copy.deepcopy(model)
    new.load_state_dict(state, strict=False)
    return new


def test_update_weights_matches_a_fresh_engine_and_drops_the_prefix_cache(
    make_engine: Callable[..., Engine], tiny: tuple[torch.nn.Module, Any]
) -> None:
    base, _ = tiny
    model = copy.deepcopy(base)
    engine = make_engine(model)
    prompts = [_prompt(30), _prompt(19, seed=4)]
    greedy = GenParams(temperature=0.0, max_tokens=16, record=True)
    old = engine.generate_many(prompts, greedy)
    assert engine.stats().cached_blocks > 0 and engine.weights_version == 0
    state = _changed(base)
    assert engine.update_weights(state) == 1 and engine.weights_version == 1
    assert engine.stats().cached_blocks == 0, "cached rows came from the old weights"
    hits = engine.stats().prefix_hit_blocks
    new = engine.generate_many(prompts, greedy)
    assert engine.stats().prefix_hit_blocks == hits, "the repeated prompts were prefilled again"
    want = make_engine(_fresh(base, state)).generate_many(prompts, greedy)
    for got, w, o in zip(new, want, old, strict=True):
        assert got.tokens == w.tokens
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(w.logprobs), atol=1e-5, rtol=0)
        assert all(torch.equal(a, b) for a, b in zip(got.routes[1:], w.routes[1:], strict=True))  # type: ignore[arg-type]
        assert got.logprobs != o.logprobs
    assert [o.tokens for o in old] != [n.tokens for n in new], "the new weights change the greedy output"
    # Without the engine thread the update applies at once.
    direct = make_engine(copy.deepcopy(base), start=False)
    assert direct.update_weights(state) == 1
    assert [c.tokens for c in direct.generate_many(prompts, greedy)] == [w.tokens for w in want]


def test_running_requests_finish_on_the_old_weights_and_queued_ones_start_on_the_new(
    make_engine: Callable[..., Engine], tiny: tuple[torch.nn.Module, Any]
) -> None:
    base, _ = tiny
    state = _changed(base)
    long_p, short_p = _prompt(20), _prompt(15, seed=5)
    long_gp, short_gp = GenParams(temperature=0.0, max_tokens=60), GenParams(temperature=0.0, max_tokens=10)
    (want_long,) = make_engine(base).generate_many([long_p], long_gp)
    (want_short,) = make_engine(_fresh(base, state)).generate_many([short_p], short_gp)

    engine = make_engine(copy.deepcopy(base))
    started, long_out = threading.Event(), []
    tokens: list[int] = []

    def on_event(ev: Any) -> None:
        if hasattr(ev, "token"):
            tokens.append(ev.token)
            if len(tokens) == 3:
                started.set()
        else:
            long_out.append(ev)

    engine.submit(long_p, long_gp, on_event)
    assert started.wait(30)
    version: list[int] = []
    updater = threading.Thread(target=lambda: version.append(engine.update_weights(state)))
    updater.start()
    deadline = time.monotonic() + 30
    while not engine._updates:
        assert time.monotonic() < deadline and updater.is_alive(), "the update never queued"
        time.sleep(0.001)
    (short,) = engine.generate_many([short_p], short_gp)  # submitted while the update waits
    updater.join(30)
    assert version == [1]
    assert long_out and tokens == want_long.tokens, "the running request finished on the old weights"
    assert short.tokens == want_short.tokens, "the queued request started on the new weights"


def test_update_weights_refuses_unknown_names_and_wrong_shapes(
    make_engine: Callable[..., Engine], tiny: tuple[torch.nn.Module, Any]
) -> None:
    engine = make_engine(copy.deepcopy(tiny[0]), start=False)
    with pytest.raises(ValueError, match=r"'lm_head\.weights' is not a tensor of the engine's model"):
        engine.update_weights({"lm_head.weights": torch.zeros(1)})
    with pytest.raises(
        ValueError, match=r"'lm_head.weight' has shape \(3, 64\), the model's is \(1024, 64\)"
    ):
        engine.update_weights({"lm_head.weight": torch.zeros(3, 64)})
    assert engine.weights_version == 0
