"""The DSA reference ops: sparse attention equals masked dense attention on the selected set
(hypothesis over shapes and index_topk), indexer scores equal their definition, top-k marks masked
picks, and the distillation loss has the right fixed point and gradient flow."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv.core import attention as A


def _masked_dense(q, kv, idx, scale, d_v):
    """Dense softmax over all keys with everything outside the selection masked out."""
    B, S, H, D = q.shape
    T = kv.shape[1]
    allowed = torch.zeros(B, S, T, dtype=torch.bool)
    for b in range(B):
        for s in range(S):
            for t in idx[b, s].tolist():
                if t >= 0:
                    allowed[b, s, t] = True
    logits = torch.einsum("bshd,btd->bsht", q.double(), kv.double()) * scale
    logits = logits.masked_fill(~allowed.unsqueeze(2), float("-inf"))
    probs = torch.nan_to_num(logits.softmax(-1), nan=0.0)
    return torch.einsum("bsht,btd->bshd", probs, kv[..., :d_v].double())


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 2),
    S=st.integers(1, 12),
    extra=st.integers(0, 20),
    H=st.integers(1, 4),
    d_v=st.integers(1, 12),
    rope=st.integers(0, 6),
    topk=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_sparse_equals_masked_dense_on_selected_set(B, S, extra, H, d_v, rope, topk, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    T = S + extra  # queries sit at the end of the keys (decode / chunked prefill)
    D = d_v + rope
    q = torch.randn(B, S, H, D, generator=g)
    kv = torch.randn(B, T, D, generator=g)
    scores = torch.randn(B, S, T, generator=g)
    visible = A.causal_key_mask(extra, S, T, B, torch.device("cpu"))
    scores = scores.masked_fill(~visible, float("-inf"))
    idx = A.select_topk_reference(scores, topk)
    assert idx.shape == (B, S, min(topk, T)) and idx.dtype == torch.int32
    # a pick is -1 exactly when it selected a masked key; valid picks are visible
    for b in range(B):
        for s in range(S):
            picks = [t for t in idx[b, s].tolist() if t >= 0]
            assert len(picks) == min(topk, extra + s + 1)
            assert all(visible[b, s, t] for t in picks)
    out, lse = A.sparse_mla_reference(q, kv, idx, 1 / math.sqrt(D), d_v)
    ref = _masked_dense(q, kv, idx, 1 / math.sqrt(D), d_v)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(lse).all()


def test_selection_covering_all_keys_equals_dense() -> None:
    B, S, H, D, d_v = 2, 9, 3, 10, 6
    q, kv = torch.randn(B, S, H, D), torch.randn(B, S, D)
    scores = A.indexer_scores_reference(torch.randn(B, S, 2, 4), torch.randn(B, S, 4), torch.randn(B, S, 2))
    idx = A.select_topk_reference(scores, 64)
    sparse, _ = A.sparse_mla_reference(q, kv, idx, 0.3, d_v)
    torch.testing.assert_close(sparse, A.dense_mla_reference(q, kv, 0.3, d_v), atol=1e-5, rtol=1e-5)


def test_all_masked_rows_give_zero_output_and_finite_grads() -> None:
    q = torch.randn(1, 3, 2, 8, requires_grad=True)
    kv = torch.randn(1, 5, 8, requires_grad=True)
    idx = torch.full((1, 3, 4), -1, dtype=torch.int32)
    idx[0, 1, 0] = 2
    out, lse = A.sparse_mla_reference(q, kv, idx, 0.5, 6)
    assert out[0, 0].abs().max() == 0 and out[0, 2].abs().max() == 0
    assert torch.isneginf(lse[0, 0]).all() and torch.isfinite(lse[0, 1]).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(kv.grad).all()


def test_indexer_scores_match_definition() -> None:
    B, S, T, H, D = 2, 4, 7, 3, 5
    q, k, w = torch.randn(B, S, H, D), torch.randn(B, T, D), torch.randn(B, S, H)
    offset = torch.tensor([3, 1])
    got = A.indexer_scores_reference(q, k, w, offset)
    for b in range(B):
        for t in range(S):
            for s in range(T):
                if s > offset[b] + t:
                    assert got[b, t, s] == float("-inf")
                else:
                    want = sum(float(w[b, t, h]) * max(0.0, float(q[b, t, h] @ k[b, s])) for h in range(H))
                    assert abs(float(got[b, t, s]) - want) < 1e-4


def test_indexer_kl_loss_zero_at_target_and_grad_only_into_scores() -> None:
    B, S, H, D = 1, 6, 2, 8
    q, kv = torch.randn(B, S, H, D, requires_grad=True), torch.randn(B, S, D, requires_grad=True)
    p = A.attention_probs_summed_reference(q, kv, 0.4)
    assert torch.allclose(p.sum(-1), torch.ones(B, S))
    # scores equal to log p make softmax(scores) == p: the loss is ~0
    perfect = torch.log(p).requires_grad_(True)
    assert A.indexer_kl_loss_reference(q, kv, perfect, 0.4).item() < 1e-6
    scores = torch.randn(B, S, S).masked_fill(
        ~A.causal_key_mask(0, S, S, B, torch.device("cpu")), float("-inf")
    )
    scores.requires_grad_(True)
    loss = A.indexer_kl_loss_reference(q, kv, scores, 0.4)
    assert loss.item() > 0
    loss.backward()
    assert scores.grad is not None and q.grad is None and kv.grad is None
    # restricted to a selection, the loss only sees selected keys
    idx = A.select_topk_reference(scores.detach(), 2)
    sparse_loss = A.indexer_kl_loss_reference(q, kv, scores, 0.4, idx)
    assert sparse_loss.item() >= 0


def _kl_target_by_hand(q, kv, scale, offset, keys):
    """The indexer's target with Python floats: for query ``t`` of row ``b``, each head's softmax over
    ``keys(b, t)`` (the visible keys, ``s <= offset[b] + t``, or the selected ones), summed over heads
    and normalised. Returns ``{(b, t): {s: p}}``."""
    B, S, H, _ = q.shape
    target = {}
    for b in range(B):
        for t in range(S):
            summed = dict.fromkeys(keys(b, t), 0.0)
            for h in range(H):
                logits = {s: float(q[b, t, h].double() @ kv[b, s].double()) * scale for s in summed}
                top = max(logits.values())
                z = sum(math.exp(v - top) for v in logits.values())
                for s, v in logits.items():
                    summed[s] += math.exp(v - top) / z
            total = sum(summed.values())
            target[b, t] = {s: v / total for s, v in summed.items()}
    return target


def _kl_by_hand(target, scores):
    """Mean over queries of ``KL(p_t || softmax(scores_t))``, the softmax over the target's keys."""
    kls = []
    for (b, t), p in target.items():
        top = max(scores[b][t][s] for s in p)
        log_z = top + math.log(sum(math.exp(scores[b][t][s] - top) for s in p))
        kls.append(sum(v * (math.log(v) - (scores[b][t][s] - log_z)) for s, v in p.items() if v > 0))
    return sum(kls) / len(kls)


def test_indexer_kl_target_and_loss_equal_a_hand_computed_oracle(monkeypatch: pytest.MonkeyPatch) -> None:
    """The distillation target and loss against loops over keys: the dense target covers exactly the
    causally visible keys of each query (per-row offsets, so row 1 has keys past its last query), the
    sparse one exactly the selected keys; future keys get no probability."""
    monkeypatch.delenv("DSV_KERNELS", raising=False)  # CPU tensors: the public ops run the references
    torch.manual_seed(7)
    B, S, H, D, T, scale = 2, 5, 3, 6, 7, 0.45
    q, kv = torch.randn(B, S, H, D) * 1.5, torch.randn(B, T, D)
    offset = torch.tensor([2, 0])
    visible = A.causal_key_mask(offset, S, T, B, torch.device("cpu"))
    scores = torch.randn(B, S, T).masked_fill(~visible, float("-inf"))  # as indexer_scores gives them

    dense = _kl_target_by_hand(q, kv, scale, offset, lambda b, t: range(int(offset[b]) + t + 1))
    p = A.attention_probs_summed_reference(q, kv, scale, offset)
    want = torch.zeros(B, S, T, dtype=torch.float64)
    for (b, t), row in dense.items():
        for s, v in row.items():
            want[b, t, s] = v
    torch.testing.assert_close(p.double(), want, atol=1e-6, rtol=0)
    assert (p[~visible] == 0).all(), "future keys carry no target probability"
    loss = A.indexer_kl_loss(q, kv, scores, scale, q_offset=offset)
    assert math.isclose(loss.item(), _kl_by_hand(dense, scores.tolist()), rel_tol=1e-5, abs_tol=1e-6)

    # Sparse stage: two keys per query (the first query of row 1 sees one key: the other is -1).
    idx = A.select_topk_reference(scores, 2)
    assert (idx[1, 0] == -1).sum() == 1
    chosen = {(b, t): [s for s in idx[b, t].tolist() if s >= 0] for b in range(B) for t in range(S)}
    sparse = _kl_target_by_hand(q, kv, scale, offset, lambda b, t: chosen[b, t])
    p_sparse = A.attention_probs_summed_reference(q, kv, scale, offset, idx)
    for (b, t), row in sparse.items():
        for k, s in enumerate(idx[b, t].tolist()):
            assert math.isclose(float(p_sparse[b, t, k]), row.get(s, 0.0), abs_tol=1e-6), (b, t, s)
    sparse_loss = A.indexer_kl_loss(q, kv, scores, scale, idx=idx, q_offset=offset)
    assert math.isclose(sparse_loss.item(), _kl_by_hand(sparse, scores.tolist()), rel_tol=1e-5, abs_tol=1e-6)


def test_forced_backend_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSV_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="DSV_KERNELS"):
        A.backend_for(torch.zeros(1))
    monkeypatch.setenv("DSV_KERNELS", "torch")
    assert A.backend_for(torch.zeros(1)) == "torch"


def test_indexer_scores_in_query_chunks_equal_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(3)
    B, S, T, H, D = 2, 13, 20, 3, 8
    q = torch.randn(B, S, H, D, requires_grad=True)
    k = torch.randn(B, T, D, requires_grad=True)
    w = torch.randn(B, S, H, requires_grad=True)
    off = torch.tensor([7, 4])
    one = A.indexer_scores_reference(q, k, w, off)
    g_one = torch.autograd.grad(one.nan_to_num(neginf=0.0).square().sum(), (q, k, w))
    monkeypatch.setattr(A, "_INDEXER_CHUNK_ELEMS", B * H * T * 4)  # chunks of 4 queries, the last of 1
    chunked = A.indexer_scores_reference(q, k, w, off)
    g_chunked = torch.autograd.grad(chunked.nan_to_num(neginf=0.0).square().sum(), (q, k, w))
    assert torch.equal(chunked.isinf(), one.isinf())
    torch.testing.assert_close(chunked, one, rtol=1e-6, atol=1e-5)  # matmul blocking may round differently
    for a, b in zip(g_chunked, g_one, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(1, 3),
    S=st.integers(1, 6),
    extra=st.integers(0, 30),
    H=st.integers(1, 4),
    topk=st.integers(1, 24),
    seed=st.integers(0, 2**16),
    strided=st.booleans(),
)
def test_fused_cpu_paths_equal_the_references(B, S, extra, H, topk, seed, strided) -> None:
    """Inference on CPU takes one fused attention call (sparse_mla, dense_mla): same outputs, same
    lse, including rows with masked picks, rows that see nothing, and cache views with padding."""
    g = torch.Generator().manual_seed(seed)
    T, D, d_v = S + extra, 12, 8
    q = torch.randn(B, S, H, D, generator=g)
    buf = torch.randn(B + 2, T + 5, D, generator=g)
    kv = buf[:B, :T] if strided else buf[:B, :T].contiguous()  # the staging buffer hands out views
    scores = torch.randn(B, S, T, generator=g)
    offset = torch.randint(0, extra + 1, (B,), generator=g)
    visible = A.causal_key_mask(offset, S, T, B, torch.device("cpu"))
    scores = scores.masked_fill(~visible, float("-inf"))
    idx = A.select_topk_reference(scores, topk)
    idx[0, 0] = -1  # a query that sees nothing
    with torch.inference_mode():
        out, lse = A.sparse_mla(q, kv, idx, 0.3, d_v)
        ref_out, ref_lse = A.sparse_mla_reference(q, kv, idx, 0.3, d_v)
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
        assert lse[0, 0].eq(float("-inf")).all()
        dense = A.dense_mla(q, kv, 0.3, d_v, offset)
        torch.testing.assert_close(
            dense, A.dense_mla_reference(q, kv, 0.3, d_v, offset), atol=1e-5, rtol=1e-5
        )
    # With autograd recording, the references run (the kernels' ground truth keeps its backward).
    qg = q.clone().requires_grad_()
    out, _ = A.sparse_mla(qg, kv, idx, 0.3, d_v)
    assert out.grad_fn is not None
    out.sum().backward()
    assert torch.isfinite(qg.grad).all()
