"""Lightning-indexer kernels vs. the torch reference (bf16/fp32 and FP8), prefill and decode, and the
Triton backward (dq, dk, dw) vs. autograd through the reference: ragged per-sequence offsets, rows that
see a single key (offset 0), keys past every query, NaN incoming gradient on the masked (future) entries.
Backward tolerances (max error / max |reference|): fp32 1e-4, bf16 2e-2.

Run: ``pytest kernels/tests/test_kernels_indexer.py`` (interpreter, CPU).
"""

from __future__ import annotations

import pytest
import torch

import dsv.kernels as K
from dsv.core.attention import indexer_scores_reference
from dsv.kernels.ops.indexer.reference import indexer_scores_fp8_reference

CASES = [  # B, S, T, H, D, q_offset
    pytest.param(2, 7, 7, 4, 32, 0, id="prefill-B2-S7-H4-D32"),
    pytest.param(2, 33, 33, 3, 20, 0, id="prefill-odd-S33-H3-D20"),
    pytest.param(1, 5, 40, 2, 72, 35, id="chunked-prefill-offset35-D72"),
    pytest.param(3, 1, 29, 4, 16, [28, 10, 0], id="decode-ragged-offsets"),
]


def _offsets(q_offset: int | list[int]) -> int | torch.Tensor:
    return torch.tensor(q_offset) if isinstance(q_offset, list) else q_offset


TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert not got.isnan().any(), "kernel left NaN (unwritten or invalid) scores"
    assert torch.equal(got.isneginf(), want.isneginf()), "causal mask differs"
    finite = want.isfinite()
    scale = want[finite].abs().max().clamp_min(1.0)
    torch.testing.assert_close(got[finite] / scale, want[finite] / scale, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("B", "S", "T", "H", "D", "q_offset"), CASES)
def test_indexer_matches_reference(
    B: int, S: int, T: int, H: int, D: int, q_offset: int | list[int], dtype: torch.dtype
) -> None:
    q = torch.randn(B, S, H, D, dtype=dtype)
    k = torch.randn(B, T, D, dtype=dtype)
    w = torch.randn(B, S, H, dtype=torch.float32)
    off = _offsets(q_offset)
    _close(K.indexer_scores(q, k, w, q_offset=off), indexer_scores_reference(q, k, w, off), dtype)


def test_indexer_noncontiguous_inputs() -> None:
    q = torch.randn(2, 3, 6, 24).transpose(1, 2)  # (B, S, H, D) with H-major memory
    k = torch.randn(2, 24, 9).transpose(1, 2)  # (B, T, D) with D-major memory
    w = torch.randn(2, 3, 6).transpose(1, 2)
    _close(K.indexer_scores(q, k, w), indexer_scores_reference(q, k, w), torch.float32)


@pytest.mark.parametrize("ue8m0", [False, True], ids=["fp32-scale", "ue8m0-scale"])
def test_indexer_fp8_matches_reference(ue8m0: bool) -> None:
    B, S, T, H, D = 2, 9, 21, 4, 32
    q = torch.randn(B, S, H, D) * 3
    k = torch.randn(B, T, D)
    w = torch.randn(B, S, H)
    q8, qs = K.quantize_fp8_rows(q, ue8m0=ue8m0)
    k8, ks = K.quantize_fp8_rows(k, ue8m0=ue8m0)
    off = torch.tensor([12, 0])
    got = K.indexer_scores_fp8(q8, qs, k8, ks, w, q_offset=off)
    _close(got, indexer_scores_fp8_reference(q8, qs, k8, ks, w, off), torch.float32)
    # and FP8 stays close to the unquantised scores (e4m3 has a 3-bit mantissa)
    exact = indexer_scores_reference(q, k, w, off)
    finite = exact.isfinite()
    err = (got[finite] - exact[finite]).abs().max() / exact[finite].abs().max()
    assert err < 0.1


def test_quantize_fp8_rows_roundtrip_and_scales() -> None:
    x = torch.randn(5, 7, 64) * torch.logspace(-3, 3, 7).view(1, 7, 1)
    x8, scale = K.quantize_fp8_rows(x, ue8m0=True)
    assert x8.dtype == torch.float8_e4m3fn and scale.shape == (5, 7)
    assert torch.equal(torch.log2(scale), torch.log2(scale).round()), "ue8m0 scales are powers of two"
    assert x8.float().abs().max() <= 448
    torch.testing.assert_close(K.dequantize_fp8_rows(x8, scale), x, rtol=0.07, atol=1e-6)


def test_indexer_bad_inputs_name_the_argument() -> None:
    q, k, w = torch.randn(2, 3, 4, 16), torch.randn(2, 5, 16), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"k: expected shape \[B, T, D\]"):
        K.indexer_scores(q, torch.randn(2, 5, 8), w)
    with pytest.raises(ValueError, match=r"w: expected shape \[B, S, H\]"):
        K.indexer_scores(q, k, torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"q: expected shape \[B, S, H, D\]"):
        K.indexer_scores(q[0], k, w)
    with pytest.raises(TypeError, match="k: expected dtype"):
        K.indexer_scores(q, k.double(), w)
    with pytest.raises(TypeError, match="q_offset"):
        K.indexer_scores(q, k, w, q_offset=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="q_offset"):
        K.indexer_scores(q, k, w, q_offset=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="q_fp8: expected dtype"):
        K.indexer_scores_fp8(q, torch.ones(2, 3, 4), k, torch.ones(2, 5), w)


BWD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}  # max error / max |reference gradient|

BWD_CASES = [  # B, S, T, H, D, q_offset
    pytest.param(2, 6, 11, 3, 24, [5, 0], id="ragged-offsets-H3-D24"),
    pytest.param(3, 1, 10, 4, 16, [9, 3, 0], id="decode-ragged"),
    pytest.param(1, 5, 30, 20, 40, 7, id="H20-keys-past-last-query"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("B", "S", "T", "H", "D", "q_offset"), BWD_CASES)
def test_indexer_backward_matches_autograd_on_reference(
    B: int, S: int, T: int, H: int, D: int, q_offset: int | list[int], dtype: torch.dtype
) -> None:
    off = _offsets(q_offset)
    q, k, w = torch.randn(B, S, H, D, dtype=dtype), torch.randn(B, T, D, dtype=dtype), torch.randn(B, S, H)
    args_k = [t.clone().requires_grad_() for t in (q, k, w)]
    args_r = [t.clone().requires_grad_() for t in (q, k, w)]
    out = K.indexer_scores(*args_k, q_offset=off)
    ref = indexer_scores_reference(*args_r, off)
    # NaN on the masked (future) entries: their gradient must not reach q, k or w, exactly as autograd
    # through the reference's masked_fill drops it
    g = torch.randn(B, S, T).masked_fill(ref.isneginf(), float("nan"))
    got = torch.autograd.grad(out, args_k, g)
    want = torch.autograd.grad(ref, args_r, g)
    for a, b, name in zip(got, want, "qkw", strict=True):
        assert a.dtype == b.dtype and not a.isnan().any(), f"d{name}: dtype {a.dtype} or NaN"
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
        assert err <= BWD_TOL[dtype], f"d{name}: max normalised error {err:.2e}"
    last_seen = int(off if isinstance(off, int) else off.max()) + S  # keys from here on: seen by no query
    if last_seen < T:
        assert got[1][:, last_seen:].abs().max() == 0
