"""Indexer distillation loss kernels vs. the torch reference: dense warm-up and sparse stage,
forward and gradient into the index scores, plus the blockwise head-summed attention target.

Sparse stage: the target is the sparse main attention's own probabilities (each head's softmax over
the selected keys), so the kernel's log-sum-exp must equal ``sparse_mla``'s and may be taken from it.
Covers ragged offsets, two head blocks, K > context (-1 padding), a row with no valid pick, bad inputs.
Tolerances: fp32 atol 1e-5 / rtol 1e-4, bf16 atol 2e-3 / rtol 2e-2.

Run: ``pytest kernels/tests/test_kernels_indexer_kl.py`` (interpreter, CPU).
"""

from __future__ import annotations

import pytest
import torch

import dsv.kernels as K
from dsv.core.attention import (
    attention_probs_summed_reference,
    causal_key_mask,
    indexer_kl_loss_reference,
    select_topk_reference,
)

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-3, rtol=2e-2)}

CASES = [  # B, S, T, H, D, q_offset, top-k (None: dense warm-up; > T: -1 padded)
    pytest.param(2, 5, 25, 4, 40, [20, 12], None, id="dense-offset-rows-T25-D40"),
    pytest.param(1, 9, 20, 18, 24, 11, None, id="dense-H18-two-head-blocks"),
    pytest.param(2, 7, 7, 3, 40, 0, 3, id="sparse-prefill-k3"),
    pytest.param(2, 5, 25, 4, 40, [20, 12], 9, id="sparse-offset-rows-k9"),
    pytest.param(1, 6, 9, 18, 24, 3, 14, id="sparse-H18-k-larger-than-T"),
]


def _inputs(B: int, S: int, T: int, H: int, D: int, q_offset: int | list[int], dtype: torch.dtype):  # type: ignore[no-untyped-def]
    off = torch.tensor(q_offset) if isinstance(q_offset, list) else q_offset
    q = torch.randn(B, S, H, D, dtype=dtype)
    kv = torch.randn(B, T, D, dtype=dtype)
    visible = causal_key_mask(off, S, T, B, torch.device("cpu"))
    scores = (torch.randn(B, S, T) * 2).masked_fill(~visible, float("-inf"))
    return q, kv, scores, off


def _selection(scores: torch.Tensor, k: int | None) -> torch.Tensor | None:
    # the indexer's own top-k (masked picks are -1); k > T pads every row with -1
    if k is None:
        return None
    idx = select_topk_reference(scores, k)
    pad = k - idx.shape[-1]
    return torch.cat([idx, idx.new_full((*idx.shape[:2], pad), -1)], -1) if pad > 0 else idx


# the loss test below runs the same target kernels in both dtypes; here the target itself, in fp32
@pytest.mark.parametrize(("B", "S", "T", "H", "D", "q_offset", "k"), [CASES[0], CASES[4]])
def test_attention_probs_summed(
    B: int, S: int, T: int, H: int, D: int, q_offset: int | list[int], k: int | None
) -> None:
    dtype = torch.float32
    q, kv, scores, off = _inputs(B, S, T, H, D, q_offset, dtype)
    idx = _selection(scores, k)
    sm = D**-0.5
    got = K.attention_probs_summed(q, kv, sm_scale=sm, idx=idx, q_offset=off)
    want = attention_probs_summed_reference(q, kv, sm, off, idx)
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(got.sum(-1), torch.ones(B, S))
    if idx is not None:
        assert torch.equal(got[idx < 0], torch.zeros_like(got[idx < 0])), "-1 picks get no mass"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("B", "S", "T", "H", "D", "q_offset", "k"), CASES)
def test_indexer_kl_loss_and_grad(
    B: int, S: int, T: int, H: int, D: int, q_offset: int | list[int], k: int | None, dtype: torch.dtype
) -> None:
    q, kv, scores, off = _inputs(B, S, T, H, D, q_offset, dtype)
    idx = _selection(scores, k)
    sm = D**-0.5
    s_k = scores.clone().requires_grad_()
    s_r = scores.clone().requires_grad_()
    loss = K.indexer_kl_loss(q, kv, s_k, sm_scale=sm, idx=idx, q_offset=off)
    ref = indexer_kl_loss_reference(q, kv, s_r, sm, idx, off)
    torch.testing.assert_close(loss, ref, **TOL[dtype])
    (g,) = torch.autograd.grad(loss * 3.0, s_k)
    (rg,) = torch.autograd.grad(ref * 3.0, s_r)
    assert not g.isnan().any()
    torch.testing.assert_close(g, rg, **TOL[dtype])


def test_sparse_target_uses_the_sparse_attention_lse() -> None:
    # the sparse stage's normaliser is exactly sparse_mla's lse: passing it gives the same loss, and a
    # different lse (the dense one) gives a different, wrong target
    B, S, T, H, D = 2, 4, 13, 2, 32
    q, kv, scores, off = _inputs(B, S, T, H, D, [9, 3], torch.float32)
    idx = select_topk_reference(scores, 5)
    sm = D**-0.5
    _, lse = K.sparse_mla(q, kv, idx, sm_scale=sm, d_v=16)
    s_a, s_b = scores.clone().requires_grad_(), scores.clone().requires_grad_()
    with_lse = K.indexer_kl_loss(q, kv, s_a, sm_scale=sm, idx=idx, q_offset=off, lse=lse)
    recomputed = K.indexer_kl_loss(q, kv, s_b, sm_scale=sm, idx=idx, q_offset=off)
    torch.testing.assert_close(with_lse, recomputed, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        with_lse, indexer_kl_loss_reference(q, kv, scores, sm, idx, off), **TOL[torch.float32]
    )
    torch.testing.assert_close(torch.autograd.grad(with_lse, s_a)[0], torch.autograd.grad(recomputed, s_b)[0])
    p = K.attention_probs_summed(q, kv, sm_scale=sm, idx=idx, q_offset=off, lse=lse)
    torch.testing.assert_close(p, attention_probs_summed_reference(q, kv, sm, off, idx), **TOL[torch.float32])
    dense_lse = torch.logsumexp(
        (torch.einsum("bshd,btd->bsht", q, kv) * sm).masked_fill(
            ~causal_key_mask(off, S, T, B, torch.device("cpu")).unsqueeze(2), float("-inf")
        ),
        -1,
    )
    wrong = K.attention_probs_summed(q, kv, sm_scale=sm, idx=idx, q_offset=off, lse=dense_lse)
    # rows that see more keys than they pick hold only part of the dense attention's mass
    assert (wrong.sum(-1) <= 1 + 1e-5).all() and (wrong.sum(-1) < 0.9).any()


def test_sparse_row_without_valid_picks_contributes_nothing() -> None:
    q, kv, scores, off = _inputs(1, 4, 10, 2, 32, 6, torch.float32)
    idx = select_topk_reference(scores, 4)
    idx[0, 2] = -1  # every pick of query 2 invalid: no target, KL term 0, zero gradient
    s_k = scores.clone().requires_grad_()
    loss = K.indexer_kl_loss(q, kv, s_k, sm_scale=0.2, idx=idx, q_offset=off)
    torch.testing.assert_close(
        loss, indexer_kl_loss_reference(q, kv, scores, 0.2, idx, off), **TOL[torch.float32]
    )
    (g,) = torch.autograd.grad(loss, s_k)
    assert not g.isnan().any() and torch.equal(g[0, 2], torch.zeros(10))
    assert K.attention_probs_summed(q, kv, sm_scale=0.2, idx=idx, q_offset=off)[0, 2].abs().sum() == 0


def test_kl_is_zero_when_indexer_matches_attention() -> None:
    q, kv = torch.randn(1, 6, 2, 32), torch.randn(1, 6, 32)
    p = attention_probs_summed_reference(q, kv, 0.3)
    scores = torch.log(p).requires_grad_()  # softmax(log p) = p exactly; -inf on future keys
    loss = K.indexer_kl_loss(q, kv, scores, sm_scale=0.3)
    assert abs(loss.item()) < 1e-6
    (g,) = torch.autograd.grad(loss, scores)
    assert g.abs().max() < 1e-6


def test_kl_gradient_only_into_scores_and_bad_inputs() -> None:
    q = torch.randn(1, 4, 2, 16, requires_grad=True)
    kv = torch.randn(1, 4, 16, requires_grad=True)
    scores = torch.randn(1, 4, 4).masked_fill(
        ~causal_key_mask(0, 4, 4, 1, torch.device("cpu")), float("-inf")
    )
    scores.requires_grad_()
    K.indexer_kl_loss(q, kv, scores, sm_scale=0.25).backward()
    assert q.grad is None and kv.grad is None and scores.grad is not None
    with pytest.raises(ValueError, match=r"index_scores: expected shape \[B, S, T\]"):
        K.indexer_kl_loss(q, kv, torch.randn(1, 4, 5), sm_scale=0.25)
    with pytest.raises(ValueError, match=r"idx: expected shape \[B, S, K\]"):
        K.indexer_kl_loss(q, kv, scores, sm_scale=0.25, idx=torch.zeros(1, 3, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"lse: expected shape \[B, S, H\]"):
        K.indexer_kl_loss(q, kv, scores, sm_scale=0.25, lse=torch.zeros(1, 4, 3))
    with pytest.raises(TypeError, match="lse: expected dtype"):
        K.attention_probs_summed(q, kv, sm_scale=0.25, lse=torch.zeros(1, 4, 2, dtype=torch.int32))
