"""Keep Routing and Keep Sampling Mask replayed on the real tiny model (``dsv.core.presets.tiny``).

A rollout records, per position, the MoE experts and the kept token set; the training forward
forces those experts and masks to those sets. Here: forcing the recorded routes reproduces the
recorded logits bit for bit and the sampler's log-probs; after the router's weights move, free
routing picks other experts while forced routing still runs the recorded ones (and the router
still gets a gradient through the combine weights); a right-padded batch of recorded sequences
gives each sequence its own logits.

Run: ``pytest packages/rl/tests/test_rl_replay.py``.
"""

from __future__ import annotations

import pytest
import torch

from dsv.core import presets
from dsv.core.generate import SamplingParams, generate
from dsv.core.model import DSVForCausalLM
from dsv.rl.objective import (
    forced_routes_batch,
    free_routes_of,
    route_mismatch,
    routes_from_steps,
    sampling_logprobs,
)
from dsv.rl.rollout import Rollout
from dsv.rl.trainer import _forced_routes, _kept_sets, policy_logits, update_batch


@pytest.fixture
def model() -> DSVForCausalLM:
    torch.manual_seed(0)
    # three layers: one dense, then two MoE layers (8 experts, top-2 in groups), so routes are per layer
    return DSVForCausalLM(presets.tiny(num_hidden_layers=3)).eval()


def _ids(seed: int, *shape: int) -> torch.Tensor:
    return torch.randint(3, 1024, shape, generator=torch.Generator().manual_seed(seed))


def test_forced_recorded_routes_reproduce_the_logits_exactly(model: DSVForCausalLM) -> None:
    ids = _ids(1, 2, 24)
    with torch.no_grad():
        free = model(ids, return_routes=True)
        assert free.routes is not None
        assert free.routes[0] is None and all(
            r is not None and r.shape == (2, 24, 2) for r in free.routes[1:]
        )
        forced = model(ids, forced_routes=free.routes, return_routes=True)
    assert torch.equal(forced.logits, free.logits)
    assert forced.routes is not None
    assert all(torch.equal(a, b) for a, b in zip(forced.routes[1:], free.routes[1:], strict=True))


def test_replayed_rollout_gives_the_samplers_logprobs(model: DSVForCausalLM) -> None:
    """generate() records routes and kept sets step by step (KV cache); one training forward over
    the whole sequence with them forced and masked gives the log-probs the sampler drew with."""
    prompt = _ids(2, 6).tolist()
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, max_new_tokens=12, seed=5)
    out = generate(model, prompt, params, return_sampling_masks=True, return_routes=True)
    assert out.routes is not None and out.sampling_masks is not None
    seq = torch.tensor(prompt + out.tokens)
    routes = routes_from_steps(out.routes)  # per layer [len(seq) - 1, k]: the last token is never fed
    assert routes[0] is None and all(r is not None and r.shape == (len(seq) - 1, 2) for r in routes[1:])
    inputs = seq[None, :-1]
    forced = forced_routes_batch([routes], [inputs.shape[1]], inputs.shape[1])
    with torch.no_grad():
        logits = model(inputs, forced_routes=forced).logits[:, len(prompt) - 1 :]  # (1, C, V)
    keep = torch.stack(out.sampling_masks)[None]  # (1, C, V)
    assert int(keep[0].sum(-1).max()) < 40  # the masks really cut the vocabulary
    replayed = sampling_logprobs(logits, seq[None, len(prompt) :], 0.8, keep)
    torch.testing.assert_close(replayed.logp[0], torch.tensor(out.logprobs), rtol=0, atol=1e-4)
    # without the kept sets the same tokens have lower log-probs (their mass is spread over the vocabulary)
    unmasked = sampling_logprobs(logits, seq[None, len(prompt) :], 0.8).logp[0]
    assert (unmasked < replayed.logp[0] - 1e-6).all()


def test_after_a_router_change_free_routes_differ_and_forced_routes_hold(model: DSVForCausalLM) -> None:
    ids = _ids(3, 2, 20)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 15:] = False
    with torch.no_grad():
        recorded = model(ids, return_routes=True)
    assert recorded.routes is not None
    assert route_mismatch(recorded.routes, recorded.routes, mask) == 0.0
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # an update moved the routers (by a quarter of their init std, 0.02)
        for moe in model.moe_layers:
            moe.gate.weight.add_(torch.randn(moe.gate.weight.shape, generator=gen) * 0.005)
    with torch.no_grad():
        free = model(ids, return_routes=True)
    assert free.routes is not None
    mismatch = route_mismatch(free.routes, recorded.routes, mask)
    assert 0.0 < mismatch < 1.0  # 0.21 here: 15 of the 70 (token, layer) routes moved
    forced = model(ids, forced_routes=recorded.routes, return_routes=True)
    assert forced.routes is not None
    for moe, rec, used in zip(model.moe_layers, recorded.routes[1:], forced.routes[1:], strict=True):
        assert rec is not None and used is not None
        assert torch.equal(used, rec)  # the experts the rollout used, not the router's new top-k
        assert torch.equal(moe.expert_load, torch.bincount(rec.flatten(), minlength=8))
    assert not torch.allclose(forced.logits, free.logits)  # the routes matter for the output
    # the combine weights still come from the current router at the forced experts: it trains
    forced.logits.logsumexp(-1).mean().backward()
    for moe in model.moe_layers:
        assert moe.gate.weight.grad is not None and moe.gate.weight.grad.abs().sum() > 0


def test_free_routes_come_from_the_forced_forward_itself(model: DSVForCausalLM) -> None:
    """free_routes_of: the gates of one forced training forward also give their own top-k, equal
    to a free forward's routes where the layers before agree, and the forced output is unchanged."""
    ids = _ids(6, 2, 20)
    mask = torch.ones(2, 20, dtype=torch.bool)
    with torch.no_grad():
        recorded = model(ids, return_routes=True)
    assert recorded.routes is not None
    # unchanged weights: the gates would choose what was recorded
    with free_routes_of(model) as free:
        out = model(ids, forced_routes=recorded.routes)
    assert free[0] is None and all(f is not None and f.shape == (2, 20, 2) for f in free[1:])
    assert route_mismatch(free, recorded.routes, mask) == 0.0
    with torch.no_grad():  # the routers move, as in test_after_a_router_change_...
        for moe in model.moe_layers:
            moe.gate.weight.add_(
                torch.randn(moe.gate.weight.shape, generator=torch.Generator().manual_seed(7)) * 0.005
            )
        plain = model(ids, forced_routes=recorded.routes)
        free_forward = model(ids, return_routes=True)
    assert free_forward.routes is not None
    with free_routes_of(model) as free:
        out = model(ids, forced_routes=recorded.routes)
    assert torch.equal(out.logits, plain.logits)  # asking the gates changes nothing in the forward
    # the first MoE layer sees the same input either way: its free choice is the free forward's
    assert free[1] is not None and torch.equal(free[1], free_forward.routes[1])
    assert route_mismatch(free, recorded.routes, mask) > 0.0
    out.logits.logsumexp(-1).mean().backward()  # the extra gate call kept no graph
    assert all(moe.gate.weight.grad is not None for moe in model.moe_layers)
    # without forced routes the gates' own choice is what ran; the hooks are gone after the block
    with torch.no_grad(), free_routes_of(model) as free:
        model(ids)
    assert all(torch.equal(f, r) for f, r in zip(free[1:], free_forward.routes[1:], strict=True))
    assert all(not moe._forward_hooks for moe in model.moe_layers)


def test_forced_routes_batch_pads_recorded_sequences(model: DSVForCausalLM) -> None:
    seqs = [_ids(4, 9), _ids(5, 14)]
    singles, recorded = [], []
    with torch.no_grad():
        for s in seqs:
            o = model(s[None], return_routes=True)
            assert o.routes is not None
            singles.append(o.logits[0])
            recorded.append([None if r is None else r[0] for r in o.routes])  # per layer [n, k]
    pad = 16
    lengths = [9, 13]  # the second uses only its first 13 recorded positions
    forced = forced_routes_batch(recorded, lengths, pad)
    assert forced[0] is None
    for layer in (1, 2):
        routes = forced[layer]
        assert routes is not None and routes.shape == (2, pad, 2) and routes.dtype == torch.long
        for b, n in enumerate(lengths):
            rec = recorded[b][layer]
            assert rec is not None
            assert torch.equal(routes[b, :n], rec[:n])
            filler = routes[b, n:]
            assert ((filler >= 0) & (filler < 8)).all()  # valid expert ids...
            assert (filler[:, 0] != filler[:, 1]).all()  # ...k distinct ones per position
    batch = torch.zeros(2, pad, dtype=torch.long)
    for b, (s, n) in enumerate(zip(seqs, lengths, strict=True)):
        batch[b, :n] = s[:n]
    with torch.no_grad():
        out = model(batch, forced_routes=forced)
    # right padding is causally invisible: each sequence's positions get its own logits
    for b, n in enumerate(lengths):
        torch.testing.assert_close(out.logits[b, :n], singles[b][:n], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="length 15 must be in"):
        forced_routes_batch(recorded, [9, 15], pad)
    with pytest.raises(ValueError, match="routed in some sequences and dense"):
        forced_routes_batch([recorded[0], [recorded[1][1], recorded[1][1], recorded[1][2]]], lengths, pad)
    with pytest.raises(ValueError, match="one length per sequence"):
        forced_routes_batch(recorded, [9], pad)


def test_route_mismatch_compares_expert_sets() -> None:
    # two MoE layers (and one dense), three tokens, the last one masked out:
    #   layer 1: {0,1} vs {1,0} same set; {2,3} vs {2,4} differs; masked token ignored
    #   layer 2: {5,6} vs {5,6} same;      {0,7} vs {7,0} same
    # -> 1 differing pair out of 2 tokens x 2 layers = 0.25
    free = [None, torch.tensor([[[0, 1], [2, 3], [4, 5]]]), torch.tensor([[[5, 6], [0, 7], [1, 2]]])]
    rec = [None, torch.tensor([[[1, 0], [2, 4], [6, 7]]]), torch.tensor([[[5, 6], [7, 0], [3, 4]]])]
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert route_mismatch(free, rec, mask) == 0.25
    assert route_mismatch(free, rec, torch.ones(1, 3)) == pytest.approx(3 / 6)
    assert route_mismatch(free, rec, torch.zeros(1, 3)) == 0.0
    with pytest.raises(ValueError, match="dense in one route list"):
        route_mismatch(free, [rec[1], rec[1], rec[2]], mask)


def _recorded_rollouts(model: DSVForCausalLM) -> list[Rollout]:
    """Two groups of three samples drawn by ``generate`` (top-k, routes recorded): prompts of 40
    and 9 tokens (the first longer than the indexer's top-32, so DSA selects), completions of
    4 to 14 tokens; in one sample three middle tokens are not trained, like a tool result."""
    from dsv.synth.env import Score, Task
    from dsv.synth.episode import EpisodeResult

    out = []
    for group, prompt in enumerate([_ids(8, 40).tolist(), _ids(9, 9).tolist()]):
        task = Task(id=f"t-{group}", family="replay", seed=group, difficulty=1, prompt="", tools=[], state={}, answer_format="")
        for i in range(3):
            params = SamplingParams(temperature=0.9, top_k=40, max_new_tokens=4 + 5 * i, seed=10 * group + i)
            gen = generate(model, prompt, params, return_sampling_masks=True, return_routes=True)
            assert gen.routes is not None and gen.sampling_masks is not None
            n = len(gen.tokens)
            trained = [False] * len(prompt) + [True] * n
            if i == 2:
                trained[len(prompt) + 4 : len(prompt) + 7] = [False] * 3
            kept = [None] * len(prompt) + [m.nonzero().squeeze(1) for m in gen.sampling_masks]
            out.append(Rollout(
                task=task, group=group, tokens=prompt + gen.tokens, prompt_len=len(prompt), trained=trained,
                sample_logprobs=[0.0] * len(prompt) + gen.logprobs, logprobs=[0.0] * (len(prompt) + n), kept=kept,
                routes=routes_from_steps(gen.routes), result=EpisodeResult([], [], None, Score(0.0, False, ""), 0, 1),
                finish_reason=gen.finish_reason, steps=1, completion_text="",
            ))  # fmt: skip
    return out


def test_the_update_runs_each_prompt_once_and_matches_the_full_forward(model: DSVForCausalLM) -> None:
    """update_batch + policy_logits (each group's prompt forwarded once, the rows' rests on top of
    it) give the log-probs and the gradients of one forward over every full row, and the
    sampler's own log-probs, with routes replayed and kept sets applied."""
    model.train()
    rolls = _recorded_rollouts(model)
    batch = update_batch(rolls, torch.device("cpu"))
    lengths = [len(r.tokens) - 1 for r in rolls]
    assert batch.lengths == lengths and max(lengths) == batch.T
    assert batch.prefix.shape == (2, 39) and batch.split.tolist() == [39] * 3 + [8] * 3
    assert batch.group.tolist() == [0, 0, 0, 1, 1, 1]
    R = batch.inputs.shape[1]
    assert max(n - s for n, s in zip(lengths, batch.split.tolist(), strict=True)) == R
    assert 2 * 39 + 6 * R == 162 < 6 * batch.T == 318  # the layers run about half the positions
    assert int(batch.mask.sum()) == sum(sum(r.trained) for r in rolls)
    forced = _forced_routes(rolls, batch.T, torch.device("cpu"))
    keep = _kept_sets(rolls, batch, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]

    shared = sampling_logprobs(policy_logits(model, batch, forced), batch.targets, 0.9, keep).logp
    shared_grads = torch.autograd.grad(shared[batch.mask].sum(), params, allow_unused=True)

    # The reference: every full row in one right-padded forward, the kept sets as a dense mask.
    full_in = torch.zeros(6, batch.T, dtype=torch.long)
    for b, r in enumerate(rolls):
        full_in[b, : lengths[b]] = torch.tensor(r.tokens[:-1])
    full_logits = model(full_in, forced_routes=forced).logits
    # the rest's position t of row b is the full row's position split[b] + t
    at = (batch.split[:, None] + torch.arange(R)[None]).clamp(max=batch.T - 1)
    picked = full_logits.gather(1, at[..., None].expand(6, R, full_logits.shape[-1]))
    assert keep is not None
    full = sampling_logprobs(picked, batch.targets, 0.9, keep.dense(1024)).logp
    full_grads = torch.autograd.grad(full[batch.mask].sum(), params, allow_unused=True)
    torch.testing.assert_close(shared[batch.mask], full[batch.mask], rtol=0, atol=2e-5)
    # ... and the sampler's log-probs (generate's KV-cache decode, the same routes and kept sets)
    torch.testing.assert_close(shared[batch.mask], batch.old[batch.mask], rtol=0, atol=1e-4)
    for g_shared, g_full in zip(shared_grads, full_grads, strict=True):
        assert (g_shared is None) == (g_full is None)
        if g_shared is not None:
            torch.testing.assert_close(g_shared, g_full, rtol=1e-3, atol=1e-6)
    # the prompt's own weights learn through the rows that attend to it: the embedding of a token
    # only in the long prompt gets a gradient
    emb = dict(zip([n for n, p in model.named_parameters() if p.requires_grad], shared_grads, strict=True))
    only_prompt = sorted(set(rolls[0].tokens[:39]) - {t for r in rolls for t in r.tokens[39:]} - set(rolls[3].tokens))
    grad = emb["model.embed_tokens.weight"]
    assert grad is not None and grad[only_prompt[0]].abs().sum() > 0
