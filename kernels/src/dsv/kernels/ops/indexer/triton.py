"""Triton kernels for lightning-indexer scores (bf16/fp16/fp32 and FP8 e4m3 inputs) and their backward.

``I[b,t,s] = sum_h w[b,t,h] * relu(q[b,t,h] . k[b,s])`` (times the FP8 row scales) for keys ``s`` in the
query's range ``[start, end)``, ``-inf`` elsewhere. The default range is causal: ``[0, q_offset + t + 1)``.

Forward (as DeepGEMM's and tilelang's MQA-logits kernels): one program keeps a block of ``BLOCK_T``
queries resident, their q for every head loaded once as ``[BLOCK_T * H, D]``, and streams the keys
``BLOCK_S`` rows at a time. Each step is one MMA ``[BLOCK_S, D] x [D, BLOCK_T * H]``: keys on the first
axis, (query, head) on the second, so the relu, the head weights and the sum over heads act along a
row of the accumulator, which a thread holds itself (plus a shuffle in its quad) instead of a
cross-warp reduction. Key blocks wholly outside every resident query's range are written ``-inf``
without loading a key. When the queries alone give too few programs (decode, small batch) the key
axis is split over several programs as well; each writes its own columns, so there is nothing to
merge. Keys come from a dense ``[B, T, D]`` tensor or, for serving, from a paged cache ``[P, D]``
addressed through a block table (``PAGED``). The FP8 path feeds e4m3 straight into ``tl.dot``.

Backward (``IndexerScores``): two launches that recompute ``q . k`` tile by tile for ``relu'``, one
owning queries (``dq``, ``dw``: the key tiles of the union of its queries' ranges) and one owning keys
(``dk``: the query blocks whose ranges reach its keys), so each output is written once, no atomics.

Run the checks: ``TRITON_INTERPRET=1 pytest kernels/tests/test_kernels_indexer.py
kernels/tests/test_kernels_indexer_v2.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv.kernels._checks import interpreting, next_pow2
from dsv.kernels._tl import device_fn, dot_flags, mma


@triton.jit
def _indexer_kernel(
    q_ptr, k_ptr, w_ptr, qs_ptr, ks_ptr, off_ptr, st_ptr, en_ptr, bt_ptr, out_ptr,
    S, T, H, D, PAGE, BLOCKS_PER_SPLIT,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kd,
    stride_wb, stride_ws, stride_wh,
    stride_qsb, stride_qss, stride_qsh,
    stride_ksb, stride_kst,
    stride_rb, stride_rs,
    stride_btb,
    stride_ob, stride_os, stride_ot,
    FP8: tl.constexpr, HAS_RANGES: tl.constexpr, PAGED: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # grid (query blocks, key splits, B). PAGED: k_ptr is the cache [P, D] (stride_kb unused), key s of
    # sequence b is row bt[b, s // PAGE] * PAGE + s % PAGE, and ks_ptr holds one scale per cache row.
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    # (query, head) rows m = t * BLOCK_H + h: the second axis of every MMA below
    offs_m = tl.arange(0, BLOCK_T * BLOCK_H)
    t_m = (pid_t * BLOCK_T + offs_m // BLOCK_H).to(tl.int64)
    h_m = offs_m % BLOCK_H
    m_mask = (t_m < S) & (h_m < H)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(
        q_ptr
        + b * stride_qb
        + t_m[:, None] * stride_qs
        + h_m[:, None] * stride_qh
        + offs_d[None, :] * stride_qd,
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # (BLOCK_T * BLOCK_H, BLOCK_D), resident for the whole key loop
    w = tl.load(w_ptr + b * stride_wb + t_m * stride_ws + h_m * stride_wh, mask=m_mask, other=0.0).to(
        tl.float32
    )
    if FP8:
        w = w * tl.load(qs_ptr + b * stride_qsb + t_m * stride_qss + h_m * stride_qsh, mask=m_mask, other=0.0)
    # each query's key range [lo_t, hi_t), clipped to [0, T); the program's union is [lo, hi)
    offs_t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    t_mask = offs_t < S
    if HAS_RANGES:
        lo_t = tl.load(st_ptr + b * stride_rb + offs_t * stride_rs, mask=t_mask, other=0).to(tl.int64)
        hi_t = tl.load(en_ptr + b * stride_rb + offs_t * stride_rs, mask=t_mask, other=0).to(tl.int64)
    else:
        lo_t = tl.zeros([BLOCK_T], tl.int64)
        hi_t = tl.load(off_ptr + b) + offs_t + 1
    lo_t = tl.where(t_mask, tl.maximum(lo_t, 0), T)
    hi_t = tl.where(t_mask, tl.minimum(hi_t, T), 0)
    lo = tl.min(lo_t, axis=0)
    hi = tl.max(hi_t, axis=0)
    out_rows = out_ptr + b * stride_ob + offs_t[None, :] * stride_os  # (1, BLOCK_T)
    blk_end = tl.minimum((pid_c + 1) * BLOCKS_PER_SPLIT, tl.cdiv(T, BLOCK_S))
    for blk in range(pid_c * BLOCKS_PER_SPLIT, blk_end):
        s0 = blk * BLOCK_S
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_mask = offs_s < T
        if (s0 < hi) & (s0 + BLOCK_S > lo):
            # only keys inside the union are read: a paged table holds no valid page past a sequence
            k_mask = s_mask & (offs_s >= lo) & (offs_s < hi)
            if PAGED:
                page = tl.load(bt_ptr + b * stride_btb + offs_s // PAGE, mask=k_mask, other=0).to(tl.int64)
                k_row = page * PAGE + offs_s % PAGE
                k_rows = k_ptr + k_row * stride_kt
            else:
                k_rows = k_ptr + b * stride_kb + offs_s.to(tl.int64) * stride_kt
            k = tl.load(
                k_rows[:, None] + offs_d[None, :] * stride_kd,
                mask=k_mask[:, None] & d_mask[None, :],
                other=0.0,
            )  # (BLOCK_S, BLOCK_D)
            logits = mma(k, tl.trans(q), PREC, UPCAST)  # (BLOCK_S, BLOCK_T * BLOCK_H) fp32
            weighted = tl.maximum(logits, 0.0) * w[None, :]
            score = tl.sum(tl.reshape(weighted, [BLOCK_S, BLOCK_T, BLOCK_H]), axis=2)  # (BLOCK_S, BLOCK_T)
            if FP8:
                if PAGED:
                    k_scale = tl.load(ks_ptr + k_row * stride_kst, mask=k_mask, other=0.0)
                else:
                    k_scale = tl.load(ks_ptr + b * stride_ksb + offs_s * stride_kst, mask=k_mask, other=0.0)
                score = score * k_scale[:, None]
            vis = (offs_s[:, None] >= lo_t[None, :]) & (offs_s[:, None] < hi_t[None, :])
            score = tl.where(vis, score, float("-inf"))
        else:  # no resident query scores this block
            score = tl.full([BLOCK_S, BLOCK_T], float("-inf"), tl.float32)
        tl.store(
            out_rows + offs_s[:, None].to(tl.int64) * stride_ot, score, mask=s_mask[:, None] & t_mask[None, :]
        )


def _blocks(S: int, H: int, D: int, fp8: bool = False) -> tuple[int, int, int, int, int]:
    """(BLOCK_T, BLOCK_S, BLOCK_H, BLOCK_D, num_warps) of the forward."""
    block_h = next_pow2(H)
    block_d = next_pow2(D)
    if interpreting():
        return min(2, max(1, S)), 16, block_h, block_d, 4
    if S == 1:  # decode: one query a program; the key split supplies the parallelism
        return 1, 128 if block_h * block_d <= 64 * 128 else 64, block_h, block_d, 4
    # two queries of 64 index heads = 128 MMA columns. At V3.2 shapes (sm_90, see cuda_compile) four
    # queries spill (1.2 KB/thread at 4 warps, 52 B fp8 at 8), and so do 128-key steps in bf16 (16 B);
    # fp8's half-size tiles take 128 keys a step at 8 warps (234 registers)
    block_t = max(1, 128 // block_h)
    if fp8 and block_h * block_d <= 64 * 128:
        return block_t, 128, block_h, block_d, 8
    return block_t, 64 if block_h * block_d <= 64 * 128 else 32, block_h, block_d, 4


def _key_splits(programs: int, n_blocks: int) -> int:
    """How many programs share one query block's keys: enough for about two programs per SM (a
    handful in the interpreter, so that the tests cross split boundaries)."""
    if interpreting():
        target = 4
    else:
        target = 2 * torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return max(1, min(n_blocks, -(-target // max(1, programs))))


def _range_tensors(
    starts: torch.Tensor | None, ends: torch.Tensor | None, offsets: torch.Tensor, B: int, S: int
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(starts, ends, has_ranges)`` for the kernels: contiguous int32 ``[B, S]`` when either is given
    (the missing side takes its default, ``0`` or the causal end, so one layout serves both), else
    stand-in pointers (``offsets``) that the kernels, built without ranges, never read."""
    if starts is None and ends is None:
        return offsets, offsets, False
    device = offsets.device
    if starts is None:
        starts = torch.zeros((B, S), dtype=torch.int32, device=device)
    if ends is None:
        ends = offsets.view(B, 1).to(torch.int32) + torch.arange(1, S + 1, dtype=torch.int32, device=device)
    return starts.to(torch.int32).contiguous(), ends.to(torch.int32).contiguous(), True


def _range_strides(starts: torch.Tensor, has_ranges: bool) -> tuple[int, int]:
    return (starts.stride(0), starts.stride(1)) if has_ranges else (0, 0)


def launch_indexer(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    q_scale: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    *,
    starts: torch.Tensor | None = None,
    ends: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    page_size: int = 1,
) -> torch.Tensor:
    """Launch on already-validated inputs; returns fp32 ``[B, S, T]``.

    ``starts``/``ends`` int32 ``[B, S]`` (either may be ``None``: ``0`` and the causal end). With
    ``block_table [B, pages]``, ``k`` is a paged cache ``[P, D]`` (``k_scale [P]``) and
    ``T = pages * page_size``."""
    B, S, H, D = q.shape
    T = block_table.shape[1] * page_size if block_table is not None else k.shape[1]
    out = torch.empty((B, S, T), dtype=torch.float32, device=q.device)
    if S == 0 or T == 0:
        return out
    fp8 = q_scale is not None
    qs = q_scale if fp8 else w  # any tensor: unused when FP8 is off
    ks = k_scale if fp8 else w[:, :, 0]
    assert qs is not None and ks is not None
    starts, ends, has_ranges = _range_tensors(starts, ends, offsets, B, S)
    range_strides = _range_strides(starts, has_ranges)
    paged = block_table is not None
    table = block_table if paged else offsets  # unused when not paged
    assert table is not None
    if paged:  # (P, D) cache: batch stride 0 (every row reads the one store); k_scale (P,) likewise
        k_strides = (0, *k.stride())
        ks_strides = (0, *ks.stride()) if fp8 else ks.stride()
    else:
        k_strides = k.stride()
        ks_strides = ks.stride()
    block_t, block_s, block_h, block_d, warps = _blocks(S, H, D, fp8)
    n_blocks = triton.cdiv(T, block_s)
    q_blocks = triton.cdiv(S, block_t)
    splits = _key_splits(q_blocks * B, n_blocks)
    per_split = triton.cdiv(n_blocks, splits)
    grid = (q_blocks, triton.cdiv(n_blocks, per_split), B)
    _indexer_kernel[grid](
        q, k, w, qs, ks, offsets, starts, ends, table, out,
        S, T, H, D, page_size, per_split,
        *q.stride(), *k_strides, *w.stride(),
        *qs.stride(), *ks_strides, *range_strides, table.stride(0), *out.stride(),
        FP8=fp8, HAS_RANGES=has_ranges, PAGED=paged, **dot_flags(q.dtype),
        BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return out


@device_fn
def _rows(pid_t, S, H, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    # BLOCK_T queries x BLOCK_H heads flattened into BLOCK_T * BLOCK_H rows (m = t * BLOCK_H + h), so one
    # MMA covers several queries even when H alone is a thin tile
    offs_m = tl.arange(0, BLOCK_T * BLOCK_H)
    t_m = (pid_t * BLOCK_T + offs_m // BLOCK_H).to(tl.int64)
    h_m = offs_m % BLOCK_H
    return t_m, h_m, (t_m < S) & (h_m < H)


@device_fn
def _row_ranges(st_ptr, en_ptr, q_off, b, t_m, m_mask, T, stride_rb, stride_rs, HAS_RANGES: tl.constexpr):
    # each row's key range [lo, hi) as the forward scored it (causal by default), clipped to [0, T);
    # rows past S get the empty range [T, 0) so that they widen no union
    # (int32: positions fit, and two int64 [M] vectors beside dq's accumulator spill at V3.2 shapes)
    if HAS_RANGES:
        lo = tl.load(st_ptr + b * stride_rb + t_m * stride_rs, mask=m_mask, other=0)
        hi = tl.load(en_ptr + b * stride_rb + t_m * stride_rs, mask=m_mask, other=0)
    else:
        lo = tl.zeros(t_m.shape, tl.int32)
        hi = tl.minimum(q_off + t_m + 1, T).to(tl.int32)
    return tl.where(m_mask, tl.maximum(lo, 0), T), tl.where(m_mask, tl.minimum(hi, T), 0)


@triton.jit
def _indexer_bwd_dq_kernel(
    q_ptr, k_ptr, w_ptr, g_ptr, off_ptr, st_ptr, en_ptr, dq_ptr, dw_ptr,
    S, T, H, D,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kd,
    stride_wb, stride_ws, stride_wh,
    stride_gb, stride_gs, stride_gt,
    stride_rb, stride_rs,
    HAS_RANGES: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # dq_ptr (B, S, H, D) and dw_ptr (B, S, H): contiguous fp32. One program owns BLOCK_T queries and
    # walks the key tiles of the union of their ranges: dq and dw are written once, no atomics.
    pid_t = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    t_m, h_m, m_mask = _rows(pid_t, S, H, BLOCK_T, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = tl.load(
        q_ptr
        + b * stride_qb
        + t_m[:, None] * stride_qs
        + h_m[:, None] * stride_qh
        + offs_d[None, :] * stride_qd,
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # (M, BLOCK_D)
    w = tl.load(w_ptr + b * stride_wb + t_m * stride_ws + h_m * stride_wh, mask=m_mask, other=0.0).to(
        tl.float32
    )
    q_off = tl.load(off_ptr + b)
    if HAS_RANGES:  # the union of the rows' ranges
        lo_m, hi_m = _row_ranges(st_ptr, en_ptr, q_off, b, t_m, m_mask, T, stride_rb, stride_rs, HAS_RANGES)
        start = tl.min(lo_m, axis=0) // BLOCK_S * BLOCK_S
        end = tl.max(hi_m, axis=0)
    else:  # causal: up to the last query's position (scalars: the range vectors cost a spill here)
        pos_m = q_off + t_m
        start = 0
        end = tl.minimum(T, q_off + tl.minimum(S, (pid_t + 1) * BLOCK_T))
    g_rows = g_ptr + b * stride_gb + t_m[:, None] * stride_gs
    k_base = k_ptr + b * stride_kb
    dq = tl.zeros([BLOCK_T * BLOCK_H, BLOCK_D], tl.float32)
    dw = tl.zeros([BLOCK_T * BLOCK_H], tl.float32)
    for s0 in range(start, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_mask = offs_s < T
        k = tl.load(
            k_base + offs_s[:, None].to(tl.int64) * stride_kt + offs_d[None, :] * stride_kd,
            mask=s_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # (BLOCK_S, BLOCK_D)
        logits = mma(q, tl.trans(k), PREC, UPCAST)  # (M, BLOCK_S) fp32
        # keys outside a range are constant -inf in the forward: their incoming gradient is never read
        if HAS_RANGES:
            vis = (offs_s[None, :] >= lo_m[:, None]) & (offs_s[None, :] < hi_m[:, None])
        else:
            vis = m_mask[:, None] & s_mask[None, :] & (offs_s[None, :] <= pos_m[:, None])
        g = tl.load(g_rows + offs_s[None, :].to(tl.int64) * stride_gt, mask=vis, other=0.0)
        dw += tl.sum(g * tl.maximum(logits, 0.0), axis=1)
        dlog = tl.where(logits > 0.0, g * w[:, None], 0.0)
        dq += mma(dlog.to(k.dtype), k, PREC, UPCAST)
    row = (b * S + t_m) * H + h_m
    tl.store(dq_ptr + row[:, None] * D + offs_d[None, :], dq, mask=m_mask[:, None] & d_mask[None, :])
    tl.store(dw_ptr + row, dw, mask=m_mask)


@triton.jit
def _indexer_bwd_dk_kernel(
    q_ptr, k_ptr, w_ptr, g_ptr, off_ptr, st_ptr, en_ptr, dk_ptr,
    S, T, H, D,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kd,
    stride_wb, stride_ws, stride_wh,
    stride_gb, stride_gs, stride_gt,
    stride_rb, stride_rs,
    HAS_RANGES: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # dk_ptr (B, T, D): contiguous fp32. One program owns BLOCK_S keys (loaded once) and walks the
    # queries that can see them, BLOCK_T at a time: dk is written once, no atomics.
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    s_lo = pid_s * BLOCK_S
    offs_s = s_lo + tl.arange(0, BLOCK_S)
    s_mask = offs_s < T
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    k = tl.load(
        k_ptr + b * stride_kb + offs_s[:, None].to(tl.int64) * stride_kt + offs_d[None, :] * stride_kd,
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # (BLOCK_S, BLOCK_D)
    q_off = tl.load(off_ptr + b)
    if HAS_RANGES:  # any query may see these keys
        t_first = 0
    else:  # causal: queries before t_first see none of them; start on a BLOCK_T boundary (_rows)
        t_first = tl.maximum(s_lo - q_off, 0)
    dk = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    for pid_t in range(t_first // BLOCK_T, tl.cdiv(S, BLOCK_T)):
        t_m, h_m, m_mask = _rows(pid_t, S, H, BLOCK_T, BLOCK_H)
        lo_m, hi_m = _row_ranges(st_ptr, en_ptr, q_off, b, t_m, m_mask, T, stride_rb, stride_rs, HAS_RANGES)
        if (tl.min(lo_m, axis=0) < s_lo + BLOCK_S) & (tl.max(hi_m, axis=0) > s_lo):  # any query sees a key
            q = tl.load(
                q_ptr
                + b * stride_qb
                + t_m[:, None] * stride_qs
                + h_m[:, None] * stride_qh
                + offs_d[None, :] * stride_qd,
                mask=m_mask[:, None] & d_mask[None, :],
                other=0.0,
            )  # (M, BLOCK_D)
            w = tl.load(w_ptr + b * stride_wb + t_m * stride_ws + h_m * stride_wh, mask=m_mask, other=0.0)
            logits = mma(q, tl.trans(k), PREC, UPCAST)  # (M, BLOCK_S)
            vis = (offs_s[None, :] >= lo_m[:, None]) & (offs_s[None, :] < hi_m[:, None])
            g = tl.load(
                g_ptr + b * stride_gb + t_m[:, None] * stride_gs + offs_s[None, :].to(tl.int64) * stride_gt,
                mask=vis,
                other=0.0,
            )
            dlog = tl.where(logits > 0.0, g * w.to(tl.float32)[:, None], 0.0)
            dk += mma(tl.trans(dlog.to(q.dtype)), q, PREC, UPCAST)
    tl.store(
        dk_ptr + (b * T + offs_s[:, None].to(tl.int64)) * D + offs_d[None, :],
        dk,
        mask=s_mask[:, None] & d_mask[None, :],
    )


def _bwd_blocks(H: int, D: int, ranges: bool = False) -> tuple[int, int, int, int, int, int, int]:
    """(BLOCK_T for dq, BLOCK_T for dk, BLOCK_S for dq, BLOCK_S for dk, BLOCK_H, BLOCK_D, num_warps) for
    the backward kernels (``ranges``: per-query ``[start, end)`` instead of the causal rule)."""
    block_h = next_pow2(H)
    block_d = next_pow2(D)
    if interpreting():
        return 2, 1, 16, 16, block_h, block_d, 4
    # dq: 128 (query, head) rows x D = 128 fp32 accumulator, 64 registers a thread at 8 warps; with
    # ranges the rows' two bounds stay live too, and 64-key steps spill 16 B/thread (32 keys: none).
    # dk holds its [BLOCK_S, D] accumulator, the key tile and the transposed [BLOCK_S, 64] dlog tile
    # besides: 64 rows (one query of 64 index heads) and 32 keys keep it in ~245 registers with no
    # spill at V3.2 shapes (64 keys spill 36-68 B/thread, 128 rows ~300 B; see cuda_compile)
    block_s = 64 if block_d <= 128 else 32
    bs_dq = block_s // 2 if ranges else block_s
    return max(1, 128 // block_h), max(1, 64 // block_h), bs_dq, block_s // 2, block_h, block_d, 8


def indexer_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    d_out: torch.Tensor,
    starts: torch.Tensor | None = None,
    ends: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``I = sum_h w * relu(q . k)`` for incoming ``d_out [B, S, T]``: ``(dq, dk, dw)`` in the
    inputs' dtypes. Never materialises ``[B, S, H, T]``; entries of ``d_out`` outside each query's key
    range (causal by default, or ``[starts, ends)`` as in the forward) are ignored: the forward wrote
    constant ``-inf`` there."""
    B, S, H, D = q.shape
    T = k.shape[1]
    dq = torch.empty((B, S, H, D), dtype=torch.float32, device=q.device)
    dw = torch.empty((B, S, H), dtype=torch.float32, device=q.device)
    dk = torch.empty((B, T, D), dtype=torch.float32, device=q.device)
    if B * S * H == 0 or T == 0:
        return dq.zero_().to(q.dtype), dk.zero_().to(k.dtype), dw.zero_().to(w.dtype)
    lo, hi, has_ranges = _range_tensors(starts, ends, offsets, B, S)
    bt_dq, bt_dk, bs_dq, bs_dk, block_h, block_d, warps = _bwd_blocks(H, D, has_ranges)
    args = (
        S,
        T,
        H,
        D,
        *q.stride(),
        *k.stride(),
        *w.stride(),
        *d_out.stride(),
        *_range_strides(lo, has_ranges),
    )
    meta = dict(
        HAS_RANGES=has_ranges, **dot_flags(q.dtype), BLOCK_H=block_h, BLOCK_D=block_d, num_warps=warps
    )
    _indexer_bwd_dq_kernel[(triton.cdiv(S, bt_dq), B)](
        q, k, w, d_out, offsets, lo, hi, dq, dw, *args, BLOCK_T=bt_dq, BLOCK_S=bs_dq, **meta
    )
    _indexer_bwd_dk_kernel[(triton.cdiv(T, bs_dk), B)](
        q, k, w, d_out, offsets, lo, hi, dk, *args, BLOCK_T=bt_dk, BLOCK_S=bs_dk, **meta
    )
    return dq.to(q.dtype), dk.to(k.dtype), dw.to(w.dtype)


class IndexerScores(torch.autograd.Function):
    """Triton forward and backward (the indexer trains on its distillation loss): the backward
    recomputes ``q . k`` tile by tile for ``relu'`` in two launches, one owning queries (``dq``, ``dw``)
    and one owning keys (``dk``)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        w: torch.Tensor,
        offsets: torch.Tensor,
        starts: torch.Tensor | None = None,
        ends: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ctx.save_for_backward(q, k, w, offsets, starts, ends)
        return launch_indexer(q, k, w, offsets, starts=starts, ends=ends)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, d_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        q, k, w, offsets, starts, ends = ctx.saved_tensors  # type: ignore[attr-defined]
        dq, dk, dw = indexer_bwd(q, k, w, offsets, d_out, starts, ends)
        return dq, dk, dw, None, None, None
