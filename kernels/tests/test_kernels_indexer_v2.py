"""The indexer forward with resident queries and streamed keys: per-query key ranges ``[start, end)``
(prefill and decode, bf16/fp32/FP8), key splits across programs (small batches), and the paged-cache
form against the dense reference on the gathered keys.

Run: ``pytest kernels/tests/test_kernels_indexer_v2.py`` (interpreter, CPU).
"""

from __future__ import annotations

import pytest
import torch

import dsv.kernels as K
from dsv.core.attention import indexer_scores_reference
from dsv.kernels.ops.indexer.reference import indexer_scores_fp8_reference

NEG_INF = float("-inf")


def _ranged(ref: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Scores with every key visible, masked to ``[start, end)`` per query."""
    pos = torch.arange(ref.shape[-1])
    inside = (pos >= starts.unsqueeze(-1)) & (pos < ends.unsqueeze(-1))
    return ref.masked_fill(~inside, NEG_INF)


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert not got.isnan().any(), "kernel left NaN (unwritten or invalid) scores"
    assert torch.equal(got.isneginf(), want.isneginf()), "range mask differs"
    finite = want.isfinite()
    if finite.any():
        scale = want[finite].abs().max().clamp_min(1.0)
        torch.testing.assert_close(got[finite] / scale, want[finite] / scale, atol=tol, rtol=tol)


RANGE_CASES = [  # B, S, T, H, D, starts, ends
    pytest.param(
        2,
        5,
        70,
        3,
        24,
        [[0, 10, 33, 69, 5], [-3, 0, 40, 64, 2]],
        [[9, 40, 70, 75, 5], [17, 1, 48, 70, 1]],
        id="prefill-B2-S5-empty-and-clipped",
    ),
    pytest.param(1, 1, 100, 4, 16, [[37]], [[96]], id="decode-B1-key-split"),
    pytest.param(3, 1, 40, 2, 32, [[0], [20], [39]], [[40], [21], [30]], id="decode-B3"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("B", "S", "T", "H", "D", "starts", "ends"), RANGE_CASES)
def test_ranges_match_reference(
    B: int, S: int, T: int, H: int, D: int, starts: list, ends: list, dtype: torch.dtype
) -> None:
    q, k, w = torch.randn(B, S, H, D, dtype=dtype), torch.randn(B, T, D, dtype=dtype), torch.randn(B, S, H)
    st, en = torch.tensor(starts, dtype=torch.int32), torch.tensor(ends, dtype=torch.int32)
    got = K.indexer_scores(q, k, w, starts=st, ends=en)
    want = _ranged(indexer_scores_reference(q, k, w, T), st.clamp_min(0), en.clamp_max(T))
    _close(got, want, 1e-4 if dtype == torch.float32 else 2e-2)


def test_one_sided_ranges_keep_the_causal_default() -> None:
    B, S, T, H, D = 2, 6, 30, 2, 16
    q, k, w = torch.randn(B, S, H, D), torch.randn(B, T, D), torch.randn(B, S, H)
    off = torch.tensor([24, 3])
    st = torch.tensor([[0, 4, 8, 12, 16, 20], [2, 2, 2, 2, 2, 2]])
    causal = indexer_scores_reference(q, k, w, off)
    _close(
        K.indexer_scores(q, k, w, q_offset=off, starts=st), _ranged(causal, st, torch.full((B, S), T)), 1e-4
    )
    en = torch.tensor([[5] * 6, [30] * 6])  # the end alone: no causal cut
    everything = indexer_scores_reference(q, k, w, T)
    _close(K.indexer_scores(q, k, w, q_offset=off, ends=en), _ranged(everything, torch.zeros(B, S), en), 1e-4)


def test_causal_default_with_key_splits_matches_reference() -> None:
    # one query block: the keys are split over several programs, each writing its own columns
    q, k, w = torch.randn(1, 2, 4, 32), torch.randn(1, 90, 32), torch.randn(1, 2, 4)
    _close(K.indexer_scores(q, k, w, q_offset=60), indexer_scores_reference(q, k, w, 60), 1e-4)


def test_fp8_ranges_match_reference() -> None:
    B, S, T, H, D = 2, 3, 50, 4, 32
    q8, qs = K.quantize_fp8_rows(torch.randn(B, S, H, D) * 3)
    k8, ks = K.quantize_fp8_rows(torch.randn(B, T, D))
    w = torch.randn(B, S, H)
    st, en = torch.tensor([[0, 17, 40], [5, 5, 49]]), torch.tensor([[50, 33, 41], [5, 30, 50]])
    got = K.indexer_scores_fp8(q8, qs, k8, ks, w, starts=st, ends=en)
    _close(got, _ranged(indexer_scores_fp8_reference(q8, qs, k8, ks, w, T), st, en), 1e-4)


def _paged(k: torch.Tensor, page: int, extra_pages: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter dense keys ``[B, T, D]`` over shuffled pages of a cache ``[P * page, D]``; the table has
    ``extra_pages`` bogus entries past each sequence (never read)."""
    B, T, D = k.shape
    n = -(-T // page)
    perm = torch.randperm(B * n + 3)[: B * n].view(B, n)  # + 3 pages owned by no sequence
    cache = torch.randn((B * n + 3) * page, D).to(k.dtype)
    for b in range(B):
        for j in range(n):
            rows = k[b, j * page : (j + 1) * page]
            cache[perm[b, j] * page : perm[b, j] * page + rows.shape[0]] = rows
    table = torch.cat([perm, torch.full((B, extra_pages), 10**6)], 1).to(torch.int32)
    return cache, table


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_paged_decode_matches_dense_reference(fp8: bool) -> None:
    B, S, H, D, page = 3, 1, 4, 32, 8
    lengths = [37, 9, 24]
    T = max(lengths)
    q, k, w = torch.randn(B, S, H, D, dtype=torch.bfloat16), torch.randn(B, T, D), torch.randn(B, S, H)
    cache, table = _paged(k, page, extra_pages=2)
    off = torch.tensor(lengths) - 1  # each sequence's new token sees its whole cache
    width = table.shape[1] * page
    if fp8:
        q8, qs = K.quantize_fp8_rows(q.float())
        c8, cs = K.quantize_fp8_rows(cache)
        got = K.indexer_scores_paged(q8, c8, w, table, page_size=page, q_offset=off, q_scale=qs, k_scale=cs)
        pos = torch.arange(T)
        rows = torch.stack([table[b, pos // page].long() * page + pos % page for b in range(B)])  # (B, T)
        k8, ks = c8[rows], cs[rows]  # the keys and scales each sequence sees, gathered
        want = indexer_scores_fp8_reference(q8, qs, k8, ks, w, off)
        tol = 1e-4
    else:
        cache = cache.to(torch.bfloat16)
        got = K.indexer_scores_paged(q, cache, w, table, page_size=page, q_offset=off)
        want = indexer_scores_reference(q, k.to(torch.bfloat16), w, off)
        tol = 2e-2
    assert got.shape == (B, S, width)
    assert got[..., T:].isneginf().all()
    _close(got[..., :T], want, tol)
    # ranges work the same way over the pages
    st, en = torch.tensor([[30], [0], [8]]), torch.tensor([[37], [4], [20]])
    ranged = K.indexer_scores_paged(q, cache.to(torch.bfloat16), w, table, page_size=page, starts=st, ends=en)
    _close(ranged[..., :T], _ranged(indexer_scores_reference(q, k.to(torch.bfloat16), w, T), st, en), 2e-2)


def test_range_and_paged_arguments_are_checked() -> None:
    q, k, w = torch.randn(2, 3, 4, 16), torch.randn(2, 5, 16), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"starts: expected shape \[B, S\]"):
        K.indexer_scores(q, k, w, starts=torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="ends: expected dtype"):
        K.indexer_scores(q, k, w, ends=torch.zeros(2, 3))
    table = torch.zeros(2, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"k_cache: expected shape \[P, D\]"):
        K.indexer_scores_paged(q, torch.randn(8, 8), w, table, page_size=4)
    with pytest.raises(ValueError, match="page_size"):
        K.indexer_scores_paged(q, torch.randn(8, 16), w, table, page_size=0)
    with pytest.raises(ValueError, match="q_scale/k_scale"):
        K.indexer_scores_paged(q, torch.randn(8, 16), w, table, page_size=4, k_scale=torch.ones(8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backward_with_ranges_matches_autograd_on_reference(dtype: torch.dtype) -> None:
    """dq, dk, dw with per-query ranges (one empty, one past T, keys no query sees): NaN incoming
    gradient outside the ranges must not reach them, as autograd through the masked reference drops it."""
    B, S, T, H, D = 2, 5, 40, 3, 24
    q, k, w = torch.randn(B, S, H, D, dtype=dtype), torch.randn(B, T, D, dtype=dtype), torch.randn(B, S, H)
    st = torch.tensor([[0, 12, 30, 5, 20], [3, 3, 0, 38, 10]])
    en = torch.tensor([[7, 30, 50, 5, 36], [20, 9, 17, 40, 33]])
    args_k = [t.clone().requires_grad_() for t in (q, k, w)]
    args_r = [t.clone().requires_grad_() for t in (q, k, w)]
    out = K.indexer_scores(*args_k, starts=st, ends=en)
    ref = _ranged(indexer_scores_reference(*args_r, T), st, en)
    g = torch.randn(B, S, T).masked_fill(ref.isneginf(), float("nan"))
    got = torch.autograd.grad(out, args_k, g)
    want = torch.autograd.grad(ref, args_r, g)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for a, b, name in zip(got, want, "qkw", strict=True):
        assert a.dtype == b.dtype and not a.isnan().any(), f"d{name}: dtype {a.dtype} or NaN"
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
        assert err <= tol, f"d{name}: max normalised error {err:.2e}"
    assert got[1][1, 33:38].abs().max() == 0, "keys 33-37 of sequence 1 are in no range"
