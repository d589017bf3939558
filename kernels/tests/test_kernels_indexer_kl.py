"""Indexer distillation loss kernels vs. the torch reference: dense warm-up and sparse stage,
forward and gradient into the index scores, plus the blockwise head-summed attention target.

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

CASES = [  # B, S, T, H, D, q_offset
    pytest.param(2, 7, 7, 3, 40, 0, id="prefill-S7-H3-D40"),
    pytest.param(2, 5, 33, 4, 72, [28, 20], id="offset-rows-T33-D72"),
    pytest.param(1, 9, 20, 18, 24, 11, id="H18-two-head-blocks"),
]


def _inputs(B: int, S: int, T: int, H: int, D: int, q_offset: int | list[int], dtype: torch.dtype):  # type: ignore[no-untyped-def]
    off = torch.tensor(q_offset) if isinstance(q_offset, list) else q_offset
    q = torch.randn(B, S, H, D, dtype=dtype)
    kv = torch.randn(B, T, D, dtype=dtype)
    visible = causal_key_mask(off, S, T, B, torch.device("cpu"))
    scores = (torch.randn(B, S, T) * 2).masked_fill(~visible, float("-inf"))
    return q, kv, scores, off


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("B", "S", "T", "H", "D", "q_offset"), CASES)
def test_attention_probs_summed(
    B: int, S: int, T: int, H: int, D: int, q_offset: int | list[int], dtype: torch.dtype
) -> None:
    q, kv, _, off = _inputs(B, S, T, H, D, q_offset, dtype)
    sm = D**-0.5
    got = K.attention_probs_summed(q, kv, sm_scale=sm, q_offset=off)
    want = attention_probs_summed_reference(q, kv, sm, off)
    torch.testing.assert_close(got, want, **TOL[dtype])
    torch.testing.assert_close(got.sum(-1), torch.ones(B, S))


@pytest.mark.parametrize("sparse", [False, True], ids=["dense-warmup", "sparse-stage"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("B", "S", "T", "H", "D", "q_offset"), CASES)
def test_indexer_kl_loss_and_grad(
    B: int, S: int, T: int, H: int, D: int, q_offset: int | list[int], dtype: torch.dtype, sparse: bool
) -> None:
    q, kv, scores, off = _inputs(B, S, T, H, D, q_offset, dtype)
    sm = D**-0.5
    # sparse stage: the indexer's own top-k (masked picks are -1), k below the context to make it sparse
    idx = select_topk_reference(scores, max(1, T // 3)) if sparse else None
    s_k = scores.clone().requires_grad_()
    s_r = scores.clone().requires_grad_()
    loss = K.indexer_kl_loss(q, kv, s_k, sm_scale=sm, idx=idx, q_offset=off)
    ref = indexer_kl_loss_reference(q, kv, s_r, sm, idx, off)
    torch.testing.assert_close(loss, ref, **TOL[dtype])
    (g,) = torch.autograd.grad(loss * 3.0, s_k)
    (rg,) = torch.autograd.grad(ref * 3.0, s_r)
    assert not g.isnan().any()
    torch.testing.assert_close(g, rg, **TOL[dtype])


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
