"""Sparse MLA kernels (forward and Triton backward) vs. the torch reference with autograd.

Covers odd head/latent sizes, no-rope latents, invalid (-1) and out-of-range indices, fully masked
rows (out 0, lse -inf, finite gradients), K larger than the context, and the ragged varlen/paged
entry. Tolerances (on values normalised to ~1): fp32 1e-4, bf16 2e-2 forward, 3e-2 gradients.

Run: ``pytest kernels/tests/test_kernels_sparse_mla.py`` (interpreter, CPU).
"""

from __future__ import annotations

import pytest
import torch

import dsv.kernels as K
from dsv.core.attention import causal_key_mask, select_topk_reference, sparse_mla_reference
from dsv.kernels.ops.sparse_mla.reference import sparse_mla_varlen_reference

FWD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
BWD_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    assert not got.isnan().any(), f"{what}: NaN in kernel output"
    scale = want.float().abs().max().clamp_min(1.0)
    err = ((got.float() - want.float()).abs().max() / scale).item()
    assert err <= tol, f"{what}: max normalised error {err:.2e} > {tol:.0e}"


def _random_idx(B: int, S: int, T: int, K_: int, invalid_frac: float = 0.2) -> torch.Tensor:
    # distinct picks per row, some -1, padded with -1 when K > T
    picks = torch.stack([torch.randperm(T)[: min(K_, T)] for _ in range(B * S)]).view(B, S, -1)
    picks = picks.masked_fill(torch.rand(picks.shape) < invalid_frac, -1)
    if K_ > T:
        picks = torch.cat([picks, torch.full((B, S, K_ - T), -1)], dim=-1)
    return picks.int()


def _run_both(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, d_v: int, dtype: torch.dtype) -> None:
    sm_scale = q.shape[-1] ** -0.5
    qk, kvk = q.clone().requires_grad_(), kv.clone().requires_grad_()
    qr, kvr = q.clone().requires_grad_(), kv.clone().requires_grad_()
    out, lse = K.sparse_mla(qk, kvk, idx, sm_scale=sm_scale, d_v=d_v)
    ref_out, ref_lse = sparse_mla_reference(qr, kvr, idx, sm_scale, d_v)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    _assert_close(out, ref_out, FWD_TOL[dtype], "out")
    assert torch.equal(lse.isneginf(), ref_lse.isneginf())
    _assert_close(lse.nan_to_num(neginf=0.0), ref_lse.nan_to_num(neginf=0.0), FWD_TOL[dtype], "lse")
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse)
    # the lse term checks the dlse path; -inf rows contribute nothing
    loss = (out.float() * dout.float()).sum() + (lse.nan_to_num(neginf=0.0) * dlse).sum()
    ref_loss = (ref_out.float() * dout.float()).sum() + (ref_lse.nan_to_num(neginf=0.0) * dlse).sum()
    dq, dkv = torch.autograd.grad(loss, (qk, kvk))
    rdq, rdkv = torch.autograd.grad(ref_loss, (qr, kvr))
    _assert_close(dq, rdq, BWD_TOL[dtype], "dq")
    _assert_close(dkv, rdkv, BWD_TOL[dtype], "dkv")


SHAPES = [  # B, S, T, H, D, d_v, K
    pytest.param(2, 5, 24, 4, 48, 32, 16, id="B2-S5-T24-H4-D32+16-K16"),
    pytest.param(1, 5, 37, 3, 72, 64, 20, id="odd-T37-H3-D64+8-K20"),
    pytest.param(1, 6, 30, 2, 40, 40, 19, id="no-rope-D40-K19"),
    pytest.param(2, 4, 11, 2, 36, 20, 30, id="K-larger-than-T"),
    pytest.param(1, 3, 50, 20, 32, 16, 17, id="H20-two-head-blocks"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("B", "S", "T", "H", "D", "d_v", "K_"), SHAPES)
def test_sparse_mla_fwd_bwd(
    B: int, S: int, T: int, H: int, D: int, d_v: int, K_: int, dtype: torch.dtype
) -> None:
    q = torch.randn(B, S, H, D, dtype=dtype)
    kv = torch.randn(B, T, D, dtype=dtype)
    idx = _random_idx(B, S, T, K_)
    idx[0, 0] = -1  # a fully masked row: out 0, lse -inf, no NaN in gradients
    _run_both(q, kv, idx, d_v, dtype)


def test_sparse_mla_out_of_range_indices_are_invalid() -> None:
    # FlashMLA's convention: an index >= T is "no key", exactly like -1
    q, kv = torch.randn(1, 3, 2, 32), torch.randn(1, 10, 32)
    idx = _random_idx(1, 3, 10, 6, invalid_frac=0.0)
    far = idx.clone()
    far[0, :, :2] = torch.tensor([10, 99], dtype=torch.int32)
    out, lse = K.sparse_mla(q, kv, far, sm_scale=0.2, d_v=16)
    ref_out, ref_lse = sparse_mla_reference(q, kv, far.masked_fill(far >= 10, -1), 0.2, 16)
    _assert_close(out, ref_out, 1e-4, "out")
    _assert_close(lse, ref_lse, 1e-4, "lse")


def test_sparse_mla_masked_row_outputs_zero() -> None:
    q, kv = torch.randn(1, 2, 2, 32), torch.randn(1, 7, 32)
    idx = torch.full((1, 2, 5), -1, dtype=torch.int32)
    idx[0, 1, 0] = 3
    out, lse = K.sparse_mla(q, kv, idx, sm_scale=0.1, d_v=16)
    assert torch.equal(out[0, 0], torch.zeros(2, 16)) and lse[0, 0].isneginf().all()
    torch.testing.assert_close(out[0, 1], kv[0, 3, :16].expand(2, 16))  # one key: its value, exactly
    torch.testing.assert_close(lse[0, 1], (q[0, 1] @ kv[0, 3]) * 0.1)


def test_sparse_mla_with_causal_topk_equals_dense_when_k_covers_context() -> None:
    from dsv.core.attention import dense_mla_reference

    B, S, T, H, D, d_v = 2, 8, 8, 2, 48, 32
    q, kv = torch.randn(B, S, H, D), torch.randn(B, T, D)
    scores = torch.randn(B, S, T).masked_fill(
        ~causal_key_mask(0, S, T, B, torch.device("cpu")), float("-inf")
    )
    idx = select_topk_reference(scores, 64)  # every visible key, -1 for the future ones
    out, _ = K.sparse_mla(q, kv, idx, sm_scale=0.2, d_v=d_v)
    _assert_close(out, dense_mla_reference(q, kv, 0.2, d_v), 1e-4, "sparse == dense")


def test_sparse_mla_varlen_paged_ragged_batch() -> None:
    # three sequences of different lengths in a shuffled paged cache; each new token picks among its
    # own sequence's positions
    lens, page, H, D, d_v, K_ = [13, 5, 22], 4, 3, 40, 32, 8
    pages_per_seq = [(n + page - 1) // page for n in lens]
    n_pages = sum(pages_per_seq) + 2
    perm = torch.randperm(n_pages)
    block_table = torch.full((3, max(pages_per_seq)), -1, dtype=torch.int32)
    used = 0
    for s, n in enumerate(pages_per_seq):
        block_table[s, :n] = perm[used : used + n].int()
        used += n
    cache = torch.randn(n_pages * page, D)
    q_per_seq = [2, 1, 4]  # new tokens per sequence (prefill chunk, decode, prefill chunk)
    seq_ids = torch.cat([torch.full((n,), s) for s, n in enumerate(q_per_seq)])
    local = torch.stack([torch.randperm(lens[int(s)])[:K_] if lens[int(s)] >= K_ else
                         torch.cat([torch.randperm(lens[int(s)]), torch.full((K_ - lens[int(s)],), -1)])
                         for s in seq_ids]).int()  # fmt: skip
    flat = K.flat_indices_paged(local, seq_ids, block_table, page)
    q = torch.randn(len(seq_ids), H, D, requires_grad=True)
    kv = cache.clone().requires_grad_()
    out, lse = K.sparse_mla_varlen(q, kv, flat, sm_scale=0.15, d_v=d_v)
    # oracle: each token against its own sequence's contiguous latent rows
    for n, s in enumerate(seq_ids.tolist()):
        rows = torch.cat(
            [cache[int(p) * page : (int(p) + 1) * page] for p in block_table[s, : pages_per_seq[s]]]
        )
        ro, rl = sparse_mla_varlen_reference(
            q[n : n + 1].detach(), rows[: lens[s]], local[n : n + 1], 0.15, d_v
        )
        _assert_close(out[n : n + 1].detach(), ro, 1e-4, f"token {n}")
        _assert_close(lse[n : n + 1].detach(), rl, 1e-4, f"lse {n}")
    g = torch.randn_like(out)
    dq, dkv = torch.autograd.grad((out * g).sum(), (q, kv))
    q2, kv2 = q.detach().clone().requires_grad_(), cache.clone().requires_grad_()
    ro, _ = sparse_mla_varlen_reference(q2, kv2, flat, 0.15, d_v)
    rdq, rdkv = torch.autograd.grad((ro * g).sum(), (q2, kv2))
    _assert_close(dq, rdq, 1e-4, "varlen dq")
    _assert_close(dkv, rdkv, 1e-4, "varlen dkv")


def test_flat_indices_cu_seqlens() -> None:
    cu = torch.tensor([0, 4, 9])
    idx = torch.tensor([[0, 3, -1], [4, -1, 1]])
    got = K.flat_indices_cu_seqlens(idx, torch.tensor([0, 1]), cu)
    assert got.tolist() == [[0, 3, -1], [8, -1, 5]]


def test_sparse_mla_bad_inputs_name_the_argument() -> None:
    q, kv, idx = torch.randn(2, 3, 4, 24), torch.randn(2, 9, 24), torch.zeros(2, 3, 5, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"kv: expected shape \[B, T, D\]"):
        K.sparse_mla(q, torch.randn(2, 9, 20), idx, sm_scale=0.1, d_v=16)
    with pytest.raises(ValueError, match=r"idx: expected shape \[B, S, K\]"):
        K.sparse_mla(q, kv, torch.zeros(2, 4, 5, dtype=torch.int32), sm_scale=0.1, d_v=16)
    with pytest.raises(TypeError, match="idx: expected dtype"):
        K.sparse_mla(q, kv, idx.float(), sm_scale=0.1, d_v=16)
    with pytest.raises(TypeError, match=r"kv: expected dtype torch\.float32"):
        K.sparse_mla(q, kv.bfloat16(), idx, sm_scale=0.1, d_v=16)
    with pytest.raises(ValueError, match="d_v: expected <= D = 24"):
        K.sparse_mla(q, kv, idx, sm_scale=0.1, d_v=32)
    with pytest.raises(ValueError, match="sm_scale"):
        K.sparse_mla(q, kv, idx, sm_scale=-1.0, d_v=16)
    with pytest.raises(ValueError, match=r"q: expected shape \[N, H, D\]"):
        K.sparse_mla_varlen(q, kv[0], idx[0], sm_scale=0.1, d_v=16)
