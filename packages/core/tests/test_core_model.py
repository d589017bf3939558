"""Model behaviour beyond parity: Keep Routing, DSA on/off, ragged cache rows, the indexer loss."""

from __future__ import annotations

import pytest
import torch

from dsv.core.cache import DenseKVCache
from dsv.core.model import DSVForCausalLM
from dsv.core.presets import tiny


def test_forced_routes_replay_the_recorded_forward() -> None:
    model = DSVForCausalLM(tiny()).eval()
    x = torch.randint(0, 1024, (2, 20))
    with torch.no_grad():
        rec = model(x, return_routes=True)
        replay = model(x, forced_routes=rec.routes, return_routes=True)
        assert torch.equal(rec.logits, replay.logits)
        # different routes change the output: forcing is really used
        other = [None if r is None else (r + 1) % model.config.n_routed_experts for r in rec.routes]
        changed = model(x, forced_routes=other, return_routes=True)
    assert all(torch.equal(a, b) for a, b in zip(changed.routes[1:], other[1:], strict=True))
    assert not torch.allclose(changed.logits, rec.logits)
    assert rec.routes[0] is None and rec.routes[1].shape == (2, 20, 2)


def test_routing_respects_groups() -> None:
    model = DSVForCausalLM(tiny(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=2)).eval()
    with torch.no_grad():
        routes = model(torch.randint(0, 1024, (1, 30)), return_routes=True).routes[1]
    groups = routes // 2  # 4 groups of 2 experts
    assert (groups == groups[..., :1]).all(), "with topk_group=1 both experts come from one group"


@pytest.mark.parametrize("scale", [2.5, 0.6])
@pytest.mark.parametrize("norm", [True, False], ids=["renormalised", "raw"])
def test_moe_equals_its_definition_token_by_token(scale: float, norm: bool) -> None:
    """Spec §4 by hand for each token: sigmoid affinities, the biased top-2 sum picks the groups,
    the biased affinities pick the experts inside them, the unbiased affinities (renormalised or
    not) times ``routed_scaling_factor`` weigh the experts, and the shared expert is added."""
    from dsv.core.model.moe import MoE

    cfg = tiny(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
               routed_scaling_factor=scale, norm_topk_prob=norm)  # fmt: skip
    torch.manual_seed(11)
    moe = MoE(cfg).eval()
    with torch.no_grad():
        torch.nn.init.normal_(moe.gate.weight, std=0.5)
        moe.gate.e_score_correction_bias.normal_(0, 0.3)
        x = torch.randn(2, 5, cfg.hidden_size)
        out, routes = moe(x)
        per_group = cfg.n_routed_experts // cfg.n_group
        for b in range(2):
            for t in range(5):
                xt = x[b, t]
                s = (moe.gate.weight @ xt).sigmoid().tolist()
                biased = [a + float(c) for a, c in zip(s, moe.gate.e_score_correction_bias, strict=True)]
                groups = [sorted(biased[g * per_group : (g + 1) * per_group])[-2:] for g in range(cfg.n_group)]
                best = sorted(range(cfg.n_group), key=lambda g: -sum(groups[g]))[: cfg.topk_group]
                allowed = [e for e in range(cfg.n_routed_experts) if e // per_group in best]
                chosen = sorted(allowed, key=lambda e: -biased[e])[: cfg.num_experts_per_tok]
                assert sorted(routes[b, t].tolist()) == sorted(chosen), (b, t)
                w = [s[e] for e in chosen]
                w = [v / sum(w) if norm else v for v in w]
                want = moe.shared_experts(xt)
                for e, v in zip(chosen, w, strict=True):
                    want = want + v * scale * moe.experts[e](xt)
                torch.testing.assert_close(out[b, t], want, atol=1e-5, rtol=1e-5)


def test_sparse_differs_from_dense_only_beyond_topk() -> None:
    model = DSVForCausalLM(tiny(index_topk=8)).eval()
    x = torch.randint(0, 1024, (1, 24))
    with torch.no_grad():
        sparse = model(x).logits
        dense = model(x, use_sparse=False).logits
    torch.testing.assert_close(sparse[:, :8], dense[:, :8], atol=1e-5, rtol=1e-5)
    assert (sparse[:, 12:] - dense[:, 12:]).abs().max() > 1e-4


def test_ragged_cache_rows_match_single_rows() -> None:
    cfg = tiny(index_topk=6)
    model = DSVForCausalLM(cfg).eval()
    a, b = torch.randint(0, 1024, (1, 13)), torch.randint(0, 1024, (1, 9))
    with torch.no_grad():
        ref_a = model(a).logits[:, -1]
        ref_b = model(b).logits[:, -1]
        cache = DenseKVCache(cfg, 2, 16)
        # prefill both rows to different lengths: row 0 gets 12 tokens, row 1 gets 8 (+4 junk beyond)
        model(torch.cat([a[:, :12], torch.cat([b[:, :8], b[:, :4]], 1)]), cache=cache)
        cache._offsets = torch.tensor([12, 8])
        step = model(torch.cat([a[:, 12:13], b[:, 8:9]]), cache=cache).logits[:, -1]
    torch.testing.assert_close(step[0], ref_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1], ref_b[0], atol=1e-5, rtol=1e-5)


def test_indexer_loss_trains_only_the_indexer() -> None:
    model = DSVForCausalLM(tiny(index_topk=8)).train()
    x = torch.randint(0, 1024, (2, 24))
    for sparse in (False, True):
        model.zero_grad()
        out = model(x, use_sparse=sparse, indexer_loss=True)
        assert out.indexer_loss is not None and out.indexer_loss.item() > 0
        out.indexer_loss.backward()
        for i, block in enumerate(model.blocks):
            for name, p in block.named_parameters():
                has_grad = p.grad is not None and bool(p.grad.abs().sum() > 0)
                assert has_grad == name.startswith("self_attn.indexer."), f"layer {i}: {name}"
    # the LM loss never reaches the indexer
    model.zero_grad()
    out = model(x)
    torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.indexer_parameters())
    assert out.aux_loss is not None and out.aux_loss.item() > 0


def test_mtp_logits_predict_two_ahead_shapes() -> None:
    model = DSVForCausalLM(tiny()).eval()
    with torch.no_grad():
        out = model(torch.randint(0, 1024, (2, 10)), return_mtp=True)
    assert out.mtp_logits is not None and out.mtp_logits[0].shape == (2, 9, 1024)


def test_masked_dense_simulation_equals_gathered_sparse(monkeypatch) -> None:
    """The torch path may compute DSA as dense attention masked to the selection; same numbers."""
    from dsv.core import attention

    # 16 index heads: with very few, exact-zero scores tie at the top-k boundary and a full forward
    # and a decode may break the tie differently (both correct).
    model = DSVForCausalLM(tiny(index_topk=8, index_n_heads=16)).eval()
    x = torch.randint(0, 1024, (2, 30))
    outs = {}
    for ratio in (0, 1000):  # 0: always gather the selected rows; 1000: always masked dense
        monkeypatch.setattr(attention, "MASKED_DENSE_MAX_RATIO", ratio)
        monkeypatch.setattr(attention, "MASKED_DENSE_MAX_RATIO_FUSED", ratio)
        with torch.no_grad():  # inference: the fused CPU attention
            full = model(x).logits
            cache = DenseKVCache(model.config, 2, 30)
            steps = [model(x[:, :20], cache=cache).logits] + [
                model(x[:, t : t + 1], cache=cache).logits for t in range(20, 30)
            ]
        graded = model(x).logits.detach()  # autograd recording: the reference ops
        outs[ratio] = (full, torch.cat(steps, 1), graded)
    for a, b in zip(outs[0], outs[1000], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0][0], outs[0][1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0][0], outs[0][2], atol=1e-5, rtol=1e-5)


def test_logits_to_keep_is_the_tail_of_the_full_logits() -> None:
    torch.manual_seed(0)
    model = DSVForCausalLM(tiny()).eval()
    ids = torch.randint(0, 1024, (2, 40))
    with torch.no_grad():
        full = model(ids).logits
        tail = model(ids, logits_to_keep=3).logits
    assert tail.shape == (2, 3, full.shape[-1])
    torch.testing.assert_close(tail, full[:, -3:], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids, logits_to_keep=-1)


@pytest.mark.parametrize("tokens", [1, 5, 32])
def test_grouped_experts_equal_the_per_expert_loop(tokens: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small expert banks with few tokens per expert run as padded batched matmuls: same output,
    same routes, same expert load as the loop, with and without autograd."""
    from dsv.core.model.moe import MoE

    torch.manual_seed(tokens)
    moe = DSVForCausalLM(tiny()).moe_layers[0].eval()  # initialised weights (MoE alone leaves the gate empty)
    x = torch.randn(2, tokens, 64)
    assert moe._grouped_pays_off(2 * tokens * moe.gate.top_k)
    grouped, routes = moe(x)
    load = moe.expert_load.clone()
    monkeypatch.setattr(MoE, "GROUPED_MAX_BANK_BYTES", 0)
    assert not moe._grouped_pays_off(2 * tokens * moe.gate.top_k)
    looped, routes_loop = moe(x)
    torch.testing.assert_close(grouped, looped, atol=1e-6, rtol=1e-5)
    assert torch.equal(routes, routes_loop) and torch.equal(load, moe.expert_load)
    monkeypatch.undo()
    xg = x.clone().requires_grad_()
    moe(xg)[0].sum().backward()
    gx = xg.grad.clone()
    xg.grad = None
    monkeypatch.setattr(MoE, "GROUPED_MAX_BANK_BYTES", 0)
    moe(xg)[0].sum().backward()
    torch.testing.assert_close(gx, xg.grad, atol=1e-6, rtol=1e-5)


def test_grouped_experts_stay_off_for_large_experts_or_many_tokens() -> None:
    from dsv.core.model.moe import MoE
    from dsv.core.presets import small

    with torch.device("meta"):
        big = MoE(small())
    assert not big._grouped_pays_off(32 * 4)  # 16 experts of 1024 x 384: 75 MB of weights
    tiny_moe = MoE(tiny())
    assert tiny_moe._grouped_pays_off(64) and not tiny_moe._grouped_pays_off(2048)
