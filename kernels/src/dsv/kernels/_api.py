"""Public entry points of dsv.kernels: validate, then launch.

Each function checks every argument (shape, dtype, device) and raises ``ValueError``/``TypeError``
naming the argument and the expected shape before any kernel is launched. Shapes follow the contract
with ``dsv.core.attention`` (see its module docstring).
"""

from __future__ import annotations

import torch

from dsv.kernels._checks import (
    FLOAT_DTYPES,
    FP8_DTYPES,
    INDEX_DTYPES,
    check_same_device,
    check_same_dtype,
    check_tensor,
    offsets_tensor,
)
from dsv.kernels.ops.fp8_gemm.triton import QUANT_BLOCK, launch_act_quant, launch_fp8_gemm
from dsv.kernels.ops.indexer.triton import IndexerScores, launch_indexer
from dsv.kernels.ops.indexer_kl.triton import IndexerKL, head_summed_probs
from dsv.kernels.ops.sparse_mla.kv_fp8 import kv_fp8_row_bytes
from dsv.kernels.ops.sparse_mla.kv_fp8 import quantize_mla_kv_fp8 as _quantize_mla_kv_fp8
from dsv.kernels.ops.sparse_mla.triton import SparseMLA, sparse_mla_fwd
from dsv.kernels.ops.topk.triton import TORCH_TOPK_MAX_T, launch_topk, torch_topk


def availability() -> tuple[bool, str]:
    """Whether the Triton kernels can run here, and why (or why not)."""
    from dsv.kernels._checks import interpreting

    try:
        import triton
    except ImportError as exc:  # pragma: no cover - triton is a hard dependency
        return False, f"triton is not importable ({exc}); pip install 'triton>=3.0'"
    if interpreting():
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1, CPU tensors)"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in the CPU interpreter)"


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def _check_scale(sm_scale: object) -> float:
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, int | float) or not sm_scale > 0:
        raise ValueError(f"sm_scale: expected a positive float, got {sm_scale!r}")
    return float(sm_scale)


def _check_ranges(
    starts: torch.Tensor | None, ends: torch.Tensor | None, B: int, S: int, device: torch.device
) -> None:
    for name, r in (("starts", starts), ("ends", ends)):
        if r is not None:
            check_tensor(name, r, "[B, S]", ndim=2, dtypes=INDEX_DTYPES, shape=(B, S))
            if r.device != device:
                raise ValueError(f"{name}: expected device {device}, got {r.device}")


def indexer_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    *,
    q_offset: int | torch.Tensor = 0,
    starts: torch.Tensor | None = None,
    ends: torch.Tensor | None = None,
) -> torch.Tensor:
    """Lightning-indexer scores ``I[b,t,s] = sum_h w[b,t,h] * relu(q[b,t,h] . k[b,s])``.

    ``q [B, S, H, D]``, ``k [B, T, D]`` (same float dtype), ``w [B, S, H]`` (any float dtype), ``q_offset``
    int or ``[B]``: the absolute position of each row's first query. Returns fp32 ``[B, S, T]`` with
    ``-inf`` where ``s > q_offset[b] + t``. Prefill (many queries) and decode (``S = 1``) alike.
    ``starts``/``ends`` (integer ``[B, S]``) replace that rule by a key range ``[start, end)`` per query
    (clipped to ``[0, T)``; a missing side keeps its default, ``0`` or ``q_offset + t + 1``); key blocks
    outside every range are never computed. Differentiable in ``q``, ``k`` and ``w`` (the indexer
    trains on its distillation loss).
    """
    check_tensor("q", q, "[B, S, H, D]", ndim=4, dtypes=FLOAT_DTYPES)
    B, S, H, D = q.shape
    check_tensor("k", k, "[B, T, D]", ndim=3, dtypes=FLOAT_DTYPES, shape=(B, None, D))
    check_tensor("w", w, "[B, S, H]", ndim=3, dtypes=FLOAT_DTYPES, shape=(B, S, H))
    check_same_dtype(q=q, k=k)
    device = check_same_device(q=q, k=k, w=w)
    offsets = offsets_tensor(q_offset, B, device)
    _check_ranges(starts, ends, B, S, device)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or w.requires_grad):
        return IndexerScores.apply(q, k, w, offsets, starts, ends)
    return launch_indexer(q, k, w, offsets, starts=starts, ends=ends)


def indexer_scores_fp8(
    q_fp8: torch.Tensor,
    q_scale: torch.Tensor,
    k_fp8: torch.Tensor,
    k_scale: torch.Tensor,
    w: torch.Tensor,
    *,
    q_offset: int | torch.Tensor = 0,
    starts: torch.Tensor | None = None,
    ends: torch.Tensor | None = None,
) -> torch.Tensor:
    """FP8 indexer scores as in the reference model: e4m3 ``q_fp8 [B,S,H,D]`` with ``q_scale [B,S,H]``,
    e4m3 ``k_fp8 [B,T,D]`` with ``k_scale [B,T]`` (from :func:`quantize_fp8_rows`), ``w [B,S,H]``.
    ``I = k_scale[s] * sum_h w[t,h] * q_scale[t,h] * relu(q8[t,h] . k8[s])``, fp32 ``[B, S, T]``.
    ``starts``/``ends``: per-query key ranges, as in :func:`indexer_scores`."""
    check_tensor("q_fp8", q_fp8, "[B, S, H, D]", ndim=4, dtypes=FP8_DTYPES)
    B, S, H, D = q_fp8.shape
    check_tensor("q_scale", q_scale, "[B, S, H]", ndim=3, dtypes=(torch.float32,), shape=(B, S, H))
    check_tensor("k_fp8", k_fp8, "[B, T, D]", ndim=3, dtypes=FP8_DTYPES, shape=(B, None, D))
    T = k_fp8.shape[1]
    check_tensor("k_scale", k_scale, "[B, T]", ndim=2, dtypes=(torch.float32,), shape=(B, T))
    check_tensor("w", w, "[B, S, H]", ndim=3, dtypes=FLOAT_DTYPES, shape=(B, S, H))
    device = check_same_device(q_fp8=q_fp8, q_scale=q_scale, k_fp8=k_fp8, k_scale=k_scale, w=w)
    _check_ranges(starts, ends, B, S, device)
    return launch_indexer(
        q_fp8, k_fp8, w, offsets_tensor(q_offset, B, device), q_scale, k_scale, starts=starts, ends=ends
    )


def indexer_scores_paged(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    w: torch.Tensor,
    block_table: torch.Tensor,
    *,
    page_size: int,
    q_offset: int | torch.Tensor = 0,
    starts: torch.Tensor | None = None,
    ends: torch.Tensor | None = None,
    q_scale: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indexer scores over a paged key cache, for serving: ``q [B, S, H, D]`` the new queries of ``B``
    sequences (``S = 1`` in decode), ``k_cache [P, D]`` the flat cache rows (``num_pages * page_size``),
    ``block_table [B, pages]`` int: key ``s`` of sequence ``b`` is row ``block_table[b, s // page_size] *
    page_size + s % page_size``. Returns fp32 ``[B, S, pages * page_size]``, equal to
    :func:`indexer_scores` on the gathered keys; ranges as there (only keys inside a query's range are
    read, so table entries past a sequence's length may hold anything). FP8: e4m3 ``q`` and ``k_cache``
    with ``q_scale [B, S, H]`` and ``k_scale [P]``, as :func:`indexer_scores_fp8`."""
    fp8 = isinstance(q, torch.Tensor) and q.dtype in FP8_DTYPES
    dtypes = FP8_DTYPES if fp8 else FLOAT_DTYPES
    check_tensor("q", q, "[B, S, H, D]", ndim=4, dtypes=(*FLOAT_DTYPES, *FP8_DTYPES))
    B, S, H, D = q.shape
    check_tensor("k_cache", k_cache, "[P, D]", ndim=2, dtypes=dtypes, shape=(None, D))
    check_tensor("w", w, "[B, S, H]", ndim=3, dtypes=FLOAT_DTYPES, shape=(B, S, H))
    check_tensor("block_table", block_table, "[B, pages]", ndim=2, dtypes=INDEX_DTYPES, shape=(B, None))
    _check_int("page_size", page_size, 1)
    if not fp8:
        check_same_dtype(q=q, k_cache=k_cache)
    if fp8 != (q_scale is not None) or fp8 != (k_scale is not None):
        raise ValueError("q_scale/k_scale: expected both with e4m3 q and k_cache, and neither otherwise")
    tensors = dict(q=q, k_cache=k_cache, w=w, block_table=block_table)
    if q_scale is not None and k_scale is not None:
        check_tensor("q_scale", q_scale, "[B, S, H]", ndim=3, dtypes=(torch.float32,), shape=(B, S, H))
        check_tensor("k_scale", k_scale, "[P]", ndim=1, dtypes=(torch.float32,), shape=(k_cache.shape[0],))
        tensors.update(q_scale=q_scale, k_scale=k_scale)
    device = check_same_device(**tensors)
    _check_ranges(starts, ends, B, S, device)
    return launch_indexer(
        q, k_cache, w, offsets_tensor(q_offset, B, device), q_scale, k_scale, starts=starts, ends=ends,
        block_table=block_table.to(torch.int32), page_size=page_size,
    )  # fmt: skip


def topk(
    scores: torch.Tensor,
    k: int,
    *,
    method: str = "auto",
    starts: torch.Tensor | None = None,
    ends: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-``min(k, T)`` key indices of each row of ``scores [B, S, T]`` as int32 ``[B, S, min(k, T)]``.

    ``-1`` marks a pick whose score is ``-inf``. The set of indices is core's ``select_topk_reference``
    (order is unspecified; among equal scores the lowest positions win, whichever method runs). ``method``:
    ``"radix"`` (the Triton select: histogram, candidates, radix refinement), ``"torch"`` or ``"auto"``
    (torch.topk for rows up to 4096 on CUDA, radix otherwise). ``starts``/``ends`` (integer ``[B, S]``,
    either may be left out: ``0`` and ``T``): only the keys ``starts <= s < ends`` of each row are
    candidates (clipped to ``[0, T)``); a row whose range holds fewer than ``k`` keys gets ``-1`` for the
    rest, after its own picks.
    """
    check_tensor("scores", scores, "[B, S, T]", ndim=3, dtypes=FLOAT_DTYPES)
    _check_int("k", k, 1)
    if method not in ("auto", "radix", "torch"):
        raise ValueError(f"method: expected one of auto, radix, torch, got {method!r}")
    B, S, T = scores.shape
    for name, r in (("starts", starts), ("ends", ends)):
        if r is not None:
            check_tensor(name, r, "[B, S]", ndim=2, dtypes=INDEX_DTYPES, shape=(B, S))
            check_same_device(scores=scores, **{name: r})
    check_same_device(scores=scores)
    if starts is not None or ends is not None:
        if method == "torch":  # the reference rule on the range-masked row (the -1s in any order)
            return _topk_ranges_torch(scores, k, starts, ends)
        return launch_topk(scores.float(), k, starts=starts, ends=ends)
    if method == "torch" or (method == "auto" and scores.is_cuda and T <= TORCH_TOPK_MAX_T):
        return torch_topk(scores, k)
    return launch_topk(scores.float(), k)


def _topk_ranges_torch(
    scores: torch.Tensor, k: int, starts: torch.Tensor | None, ends: torch.Tensor | None
) -> torch.Tensor:
    T = scores.shape[-1]
    pos = torch.arange(T, device=scores.device)
    inside = torch.ones_like(scores, dtype=torch.bool)
    if starts is not None:
        inside &= pos >= starts.unsqueeze(-1)
    if ends is not None:
        inside &= pos < ends.unsqueeze(-1)
    return torch_topk(scores.float().masked_fill(~inside, float("-inf")), k)


def _check_mla(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, d_v: int, lead: str) -> None:
    n = len(lead)
    check_tensor("q", q, f"[{lead}H, D]", ndim=n // 3 + 2, dtypes=FLOAT_DTYPES)
    D = q.shape[-1]
    check_tensor("kv", kv, f"[{'B, ' if n else ''}T, D]", ndim=q.dim() - 1, dtypes=FLOAT_DTYPES,
                 shape=(*q.shape[: q.dim() - 3], None, D))  # fmt: skip
    check_tensor("idx", idx, f"[{lead}K]", ndim=q.dim() - 1, dtypes=INDEX_DTYPES, shape=(*q.shape[:-2], None))
    check_same_dtype(q=q, kv=kv)
    check_same_device(q=q, kv=kv, idx=idx)
    _check_int("d_v", d_v, 1)
    if d_v > D:
        raise ValueError(f"d_v: expected <= D = {D} (values are kv[..., :d_v]), got {d_v}")


def _check_splits(num_splits: int | None) -> int | None:
    return None if num_splits is None else _check_int("num_splits", num_splits, 1)


def sparse_mla(
    q: torch.Tensor,
    kv: torch.Tensor,
    idx: torch.Tensor,
    *,
    sm_scale: float,
    d_v: int,
    num_splits: int | None = None,
    deterministic: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MLA attention (absorbed form) over the selected latent rows; differentiable in q and kv.

    ``q [B, S, H, D]`` (latent query + rope dims), ``kv [B, T, D]`` (shared by all heads; values are
    ``kv[..., :d_v]``), ``idx [B, S, K]`` int32 rows of ``kv`` (``-1`` or ``>= T`` = none). Returns
    ``out [B, S, H, d_v]`` in q's dtype and the natural-log ``lse [B, S, H]`` (fp32, ``-inf`` for a row
    with no valid index; its output is 0).

    ``num_splits``: split each token's picks over this many programs, merged by log-sum-exp (``None``:
    automatic, only when few tokens would leave SMs idle). ``deterministic``: a bitwise-reproducible
    backward (ordered reduction of dkv instead of fp32 atomics; costs an fp32 buffer of bounded size
    and one extra pass, see ``sparse_mla_bwd``).
    """
    _check_mla(q, kv, idx, d_v, "B, S, ")
    splits, det = _check_splits(num_splits), bool(deterministic)
    return SparseMLA.apply(q, kv, idx.to(torch.int32), _check_scale(sm_scale), d_v, splits, det)


def sparse_mla_varlen(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    idx: torch.Tensor,
    *,
    sm_scale: float,
    d_v: int,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged-batch / paged form for serving: ``q [N, H, D]`` the new tokens of all sequences,
    ``kv_cache [P, D]`` a flat (or paged, flattened) latent cache, ``idx [N, K]`` flat cache rows (build
    them with :func:`flat_indices_cu_seqlens` or :func:`flat_indices_paged`) -> ``(out [N, H, d_v],
    lse [N, H])``. Same kernel as :func:`sparse_mla` (one "batch" spanning the whole cache); for few
    tokens (decode) each token's picks are split across SMs automatically (``num_splits`` forces a
    count)."""
    _check_mla(q, kv_cache, idx, d_v, "N, ")
    out, lse = SparseMLA.apply(
        q.unsqueeze(0), kv_cache.unsqueeze(0), idx.to(torch.int32).unsqueeze(0), _check_scale(sm_scale), d_v,
        _check_splits(num_splits), False,
    )  # fmt: skip
    return out.squeeze(0), lse.squeeze(0)


def quantize_mla_kv_fp8(kv: torch.Tensor, *, d_v: int = 512) -> torch.Tensor:
    """Pack a latent cache ``kv [..., d_v + d_r]`` (float) into the deployed FP8 layout, ``uint8 [...,
    d_v + 4 * d_v / 128 + 2 * d_r]`` (656 bytes per token for V3.2): ``d_v`` e4m3 values, one fp32
    scale per 128 of them (``max(amax, 1e-4) / 448``), then the rope values in bf16."""
    if not isinstance(kv, torch.Tensor) or kv.dim() < 1:
        raise TypeError(f"kv: expected a torch.Tensor of shape [..., D], got {type(kv).__name__}")
    check_tensor("kv", kv, "[..., D]", ndim=kv.dim(), dtypes=FLOAT_DTYPES)
    _check_fp8_dims(d_v, kv.shape[-1])
    return _quantize_mla_kv_fp8(kv, d_v)


def _check_fp8_dims(d_v: int, D: int) -> None:
    _check_int("d_v", d_v, 128)
    if d_v % 128 or d_v > D or (D - d_v) % 2:
        raise ValueError(f"d_v: expected a multiple of 128, <= D = {D}, with D - d_v even, got {d_v}")


def sparse_mla_fp8_kv(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    idx: torch.Tensor,
    *,
    sm_scale: float,
    d_v: int = 512,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sparse_mla_varlen` over an FP8 cache from :func:`quantize_mla_kv_fp8`: ``q [N, H, D]``
    (bf16/fp16/fp32), ``kv_cache uint8 [P, row_bytes]``, ``idx [N, K]`` flat rows -> ``(out [N, H,
    d_v], lse [N, H])``. The kernel dequantises each gathered 128-block with its scale; inference only
    (no autograd)."""
    check_tensor("q", q, "[N, H, D]", ndim=3, dtypes=FLOAT_DTYPES)
    N, H, D = q.shape
    _check_fp8_dims(d_v, D)
    row_bytes = kv_fp8_row_bytes(d_v, D - d_v)
    check_tensor("kv_cache", kv_cache, "[P, row_bytes]", ndim=2, dtypes=(torch.uint8,),
                 shape=(None, row_bytes))  # fmt: skip
    check_tensor("idx", idx, "[N, K]", ndim=2, dtypes=INDEX_DTYPES, shape=(N, None))
    check_same_device(q=q, kv_cache=kv_cache, idx=idx)
    with torch.no_grad():
        out, lse = sparse_mla_fwd(
            q.unsqueeze(0), kv_cache.contiguous().unsqueeze(0), idx.to(torch.int32).unsqueeze(0),
            _check_scale(sm_scale), d_v, num_splits=_check_splits(num_splits), fp8_kv=True,
        )  # fmt: skip
    return out.squeeze(0), lse.squeeze(0)


def _check_kl(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor | None, lse: torch.Tensor | None
) -> tuple[int, int, int, int, int]:
    check_tensor("q", q, "[B, S, H, D]", ndim=4, dtypes=FLOAT_DTYPES)
    B, S, H, D = q.shape
    check_tensor("kv", kv, "[B, T, D]", ndim=3, dtypes=FLOAT_DTYPES, shape=(B, None, D))
    check_same_dtype(q=q, kv=kv)
    if idx is not None:
        check_tensor("idx", idx, "[B, S, K]", ndim=3, dtypes=INDEX_DTYPES, shape=(B, S, None))
        check_same_device(q=q, kv=kv, idx=idx)
    else:
        check_same_device(q=q, kv=kv)
    if lse is not None:
        check_tensor("lse", lse, "[B, S, H]", ndim=3, dtypes=FLOAT_DTYPES, shape=(B, S, H))
        check_same_device(q=q, lse=lse)
    return B, S, H, D, kv.shape[1]


def attention_probs_summed(
    q: torch.Tensor,
    kv: torch.Tensor,
    *,
    sm_scale: float,
    idx: torch.Tensor | None = None,
    q_offset: int | torch.Tensor = 0,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-summed, L1-normalised attention probabilities (the distillation target), blockwise; equal
    to ``dsv.core.attention.attention_probs_summed_reference``.

    ``idx=None``: dense causal attention, ``[B, S, T]``. ``idx [B, S, K]``: the sparse main attention,
    each head's softmax over the selected keys only, ``[B, S, K]`` aligned with ``idx`` (0 at ``-1`` or
    ``>= T`` picks; a row with no valid pick is all 0). ``lse [B, S, H]`` (natural log) is the main
    attention's own log-sum-exp over the same keys (``sparse_mla``'s second output); passing it skips
    recomputing it.
    """
    B, *_ = _check_kl(q, kv, idx, lse)
    offsets = offsets_tensor(q_offset, B, q.device)
    with torch.no_grad():
        return head_summed_probs(
            q, kv, _check_scale(sm_scale), offsets, None if idx is None else idx.to(torch.int32), lse
        )


def indexer_kl_loss(
    q: torch.Tensor,
    kv: torch.Tensor,
    index_scores: torch.Tensor,
    *,
    sm_scale: float,
    idx: torch.Tensor | None = None,
    q_offset: int | torch.Tensor = 0,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indexer distillation loss ``mean_t KL(p_t || softmax(I_t))``, equal to
    ``dsv.core.attention.indexer_kl_loss_reference``; gradient flows only into ``index_scores [B, S, T]``.

    ``idx=None`` is the dense warm-up (all visible keys). ``idx [B, S, K]`` is the sparse stage: ``p``
    is the sparse main attention's head-summed probabilities (each head's softmax over the selection)
    and ``softmax(I)`` runs over the selected scores; ``-1`` picks are ignored; indices are assumed
    distinct per row, as top-k gives them. ``lse [B, S, H]``: see :func:`attention_probs_summed` (in the
    sparse stage, pass ``sparse_mla``'s ``lse`` to make the target cost one pass over the selection).
    """
    B, S, H, D, T = _check_kl(q, kv, idx, lse)
    check_tensor("index_scores", index_scores, "[B, S, T]", ndim=3, dtypes=FLOAT_DTYPES, shape=(B, S, T))
    check_same_device(q=q, index_scores=index_scores)
    offsets = offsets_tensor(q_offset, B, q.device)
    return IndexerKL.apply(
        index_scores, q.detach(), kv.detach(), None if idx is None else idx.to(torch.int32),
        _check_scale(sm_scale), offsets, None if lse is None else lse.detach(),
    )  # fmt: skip


def act_quant(x: torch.Tensor, *, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token, per-128-channel FP8 quantisation of activations, as the reference inference code's
    ``act_quant``: ``x [..., K]`` -> ``(x_fp8 [..., K] e4m3, scale [..., ceil(K/128)] fp32)`` with
    ``scale = max(amax, 1e-4) / 448`` (a power of two with ``ue8m0``). Equal to
    ``dsv.kernels.ops.fp8_gemm.reference.act_quant_reference``."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError(f"x: expected a torch.Tensor of shape [..., K], got {type(x).__name__}")
    check_tensor("x", x, "[..., K]", ndim=x.dim(), dtypes=FLOAT_DTYPES)
    check_same_device(x=x)
    lead, K = x.shape[:-1], x.shape[-1]
    y, s = launch_act_quant(x.reshape(-1, K).contiguous(), bool(ue8m0))
    return y.view(*lead, K), s.view(*lead, s.shape[-1])


def fp8_gemm(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Block-scaled FP8 GEMM ``(a_fp8 * a_scale) @ (w_fp8 * w_scale).T`` -> ``[..., N]`` in ``out_dtype``.

    ``a_fp8 [..., K]`` e4m3 with ``a_scale [..., ceil(K/128)]`` (from :func:`act_quant`); ``w_fp8 [N, K]``
    e4m3 with ``w_scale [ceil(N/128), ceil(K/128)]`` fp32, the checkpoint's ``weight_scale_inv`` for
    ``weight_block_size = [128, 128]``. Accumulates in fp32; equal to dequantise-then-matmul up to
    summation order."""
    if not isinstance(a_fp8, torch.Tensor) or a_fp8.dim() < 1:
        raise TypeError(f"a_fp8: expected a torch.Tensor of shape [..., K], got {type(a_fp8).__name__}")
    check_tensor("a_fp8", a_fp8, "[..., K]", ndim=a_fp8.dim(), dtypes=FP8_DTYPES)
    lead, K = a_fp8.shape[:-1], a_fp8.shape[-1]
    G = -(-K // QUANT_BLOCK)
    check_tensor("a_scale", a_scale, "[..., ceil(K/128)]", ndim=a_fp8.dim(), dtypes=(torch.float32,),
                 shape=(*lead, G))  # fmt: skip
    check_tensor("w_fp8", w_fp8, "[N, K]", ndim=2, dtypes=FP8_DTYPES, shape=(None, K))
    N = w_fp8.shape[0]
    check_tensor("w_scale", w_scale, "[ceil(N/128), ceil(K/128)]", ndim=2, dtypes=(torch.float32,),
                 shape=(-(-N // QUANT_BLOCK), G))  # fmt: skip
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype: expected one of float16, bfloat16, float32, got {out_dtype}")
    check_same_device(a_fp8=a_fp8, a_scale=a_scale, w_fp8=w_fp8, w_scale=w_scale)
    out = launch_fp8_gemm(
        a_fp8.reshape(-1, K).contiguous(), a_scale.reshape(-1, G).contiguous(), w_fp8.contiguous(),
        w_scale.contiguous(), out_dtype,
    )  # fmt: skip
    return out.view(*lead, N)


def fp8_linear(
    x: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ue8m0: bool = False,
) -> torch.Tensor:
    """``F.linear`` with an FP8 block-quantised weight: :func:`act_quant` on ``x [..., K]``, then
    :func:`fp8_gemm`; the output ``[..., N]`` has ``x``'s dtype. Inference only (no autograd)."""
    x_fp8, x_scale = act_quant(x, ue8m0=ue8m0)
    out = fp8_gemm(x_fp8, x_scale, w_fp8, w_scale, out_dtype=x.dtype)
    return out if bias is None else out + bias.to(out.dtype)
