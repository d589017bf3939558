"""Triton kernel for lightning-indexer scores (bf16/fp16/fp32 and FP8 e4m3 inputs).

``I[b,t,s] = sum_h w[b,t,h] * relu(q[b,t,h] . k[b,s])`` (times the FP8 row scales), ``-inf`` where key
``s`` is in the future of query ``t``. One program owns a block of ``BLOCK_S`` keys and ``BLOCK_T``
queries of one sequence: the key tile ``[BLOCK_S, D]`` is loaded once and reused by every query, and
for each query the whole head dimension is one MMA ``[H, D] x [D, BLOCK_S]`` (H = 64 index heads in
V3.2), reduced over heads with the weights in registers. Prefill and decode are the same kernel
(decode is S = 1 with per-sequence offsets); tiles entirely in the future are written as ``-inf``
without computing. The FP8 path feeds e4m3 straight into ``tl.dot`` (native on Hopper).

Run the checks: ``TRITON_INTERPRET=1 pytest kernels/tests/test_kernels_indexer.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv.kernels._checks import interpreting, next_pow2
from dsv.kernels._tl import device_fn, dot_flags, mma


@triton.jit
def _indexer_kernel(
    q_ptr, k_ptr, w_ptr, qs_ptr, ks_ptr, off_ptr, out_ptr,
    S, T, H, D,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kd,
    stride_wb, stride_ws, stride_wh,
    stride_qsb, stride_qss, stride_qsh,
    stride_ksb, stride_kst,
    stride_ob, stride_os, stride_ot,
    FP8: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_s = tl.program_id(0)
    pid_t = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < T
    h_mask = offs_h < H
    d_mask = offs_d < D
    q_off = tl.load(off_ptr + b)
    # (BLOCK_S, BLOCK_D) key tile, shared by all BLOCK_T queries of this program
    k = tl.load(
        k_ptr + b * stride_kb + offs_s[:, None].to(tl.int64) * stride_kt + offs_d[None, :] * stride_kd,
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if FP8:
        k_scale = tl.load(ks_ptr + b * stride_ksb + offs_s * stride_kst, mask=s_mask, other=0.0)
    out_base = out_ptr + b * stride_ob + offs_s * stride_ot
    for i in range(BLOCK_T):
        # int64: t * stride_os reaches S * T = 2^34 at 128K context
        t = (pid_t * BLOCK_T + i).to(tl.int64)
        if t < S:
            pos = q_off + t
            if pid_s * BLOCK_S > pos:  # the whole key tile is in the future of this query
                tl.store(out_base + t * stride_os, tl.full([BLOCK_S], float("-inf"), tl.float32), mask=s_mask)
            else:
                q = tl.load(
                    q_ptr
                    + b * stride_qb
                    + t * stride_qs
                    + offs_h[:, None] * stride_qh
                    + offs_d[None, :] * stride_qd,
                    mask=h_mask[:, None] & d_mask[None, :],
                    other=0.0,
                )  # (BLOCK_H, BLOCK_D)
                w = tl.load(
                    w_ptr + b * stride_wb + t * stride_ws + offs_h * stride_wh, mask=h_mask, other=0.0
                )
                w = w.to(tl.float32)
                if FP8:
                    w = w * tl.load(
                        qs_ptr + b * stride_qsb + t * stride_qss + offs_h * stride_qsh, mask=h_mask, other=0.0
                    )
                logits = mma(q, tl.trans(k), PREC, UPCAST)  # (BLOCK_H, BLOCK_S) fp32
                score = tl.sum(tl.maximum(logits, 0.0) * w[:, None], axis=0)
                if FP8:
                    score = score * k_scale
                score = tl.where(offs_s <= pos, score, float("-inf"))
                tl.store(out_base + t * stride_os, score, mask=s_mask)


def _blocks(S: int, H: int, D: int) -> tuple[int, int, int, int]:
    block_h = next_pow2(H)
    block_d = next_pow2(D)
    if interpreting():
        return min(8, max(1, S)), 16, block_h, block_d
    block_t = 1 if S == 1 else 16
    return block_t, 64 if block_h * block_d <= 64 * 128 else 32, block_h, block_d


def launch_indexer(
    q: torch.Tensor,
    k: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor,
    q_scale: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch on already-validated inputs; returns fp32 ``[B, S, T]``."""
    B, S, H, D = q.shape
    T = k.shape[1]
    out = torch.empty((B, S, T), dtype=torch.float32, device=q.device)
    if S == 0 or T == 0:
        return out
    fp8 = q_scale is not None
    qs = q_scale if fp8 else w  # any tensor: unused when FP8 is off
    ks = k_scale if fp8 else w[:, :, 0]
    assert qs is not None and ks is not None
    block_t, block_s, block_h, block_d = _blocks(S, H, D)
    grid = (triton.cdiv(T, block_s), triton.cdiv(S, block_t), B)
    _indexer_kernel[grid](
        q, k, w, qs, ks, offsets, out,
        S, T, H, D,
        *q.stride(), *k.stride(), *w.stride(),
        *qs.stride(), *ks.stride(), *out.stride(),
        FP8=fp8, **dot_flags(q.dtype), BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_H=block_h, BLOCK_D=block_d,
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


@triton.jit
def _indexer_bwd_dq_kernel(
    q_ptr, k_ptr, w_ptr, g_ptr, off_ptr, dq_ptr, dw_ptr,
    S, T, H, D,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kd,
    stride_wb, stride_ws, stride_wh,
    stride_gb, stride_gs, stride_gt,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # dq_ptr (B, S, H, D) and dw_ptr (B, S, H): contiguous fp32. One program owns BLOCK_T queries and
    # walks the key tiles up to its last query's position: dq and dw are written once, no atomics.
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
    pos_m = q_off + t_m
    end = tl.minimum(T, q_off + tl.minimum(S, (pid_t + 1) * BLOCK_T))  # last query's position + 1
    g_rows = g_ptr + b * stride_gb + t_m[:, None] * stride_gs
    k_base = k_ptr + b * stride_kb
    dq = tl.zeros([BLOCK_T * BLOCK_H, BLOCK_D], tl.float32)
    dw = tl.zeros([BLOCK_T * BLOCK_H], tl.float32)
    for s0 in range(0, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_mask = offs_s < T
        k = tl.load(
            k_base + offs_s[:, None].to(tl.int64) * stride_kt + offs_d[None, :] * stride_kd,
            mask=s_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # (BLOCK_S, BLOCK_D)
        logits = mma(q, tl.trans(k), PREC, UPCAST)  # (M, BLOCK_S) fp32
        # future keys are constant -inf in the forward: their incoming gradient is never read
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
    q_ptr, k_ptr, w_ptr, g_ptr, off_ptr, dk_ptr,
    S, T, H, D,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kd,
    stride_wb, stride_ws, stride_wh,
    stride_gb, stride_gs, stride_gt,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # dk_ptr (B, T, D): contiguous fp32. One program owns BLOCK_S keys (loaded once) and walks the
    # queries that can see them, BLOCK_T at a time: dk is written once, no atomics.
    pid_s = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    s_mask = offs_s < T
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    k = tl.load(
        k_ptr + b * stride_kb + offs_s[:, None].to(tl.int64) * stride_kt + offs_d[None, :] * stride_kd,
        mask=s_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # (BLOCK_S, BLOCK_D)
    q_off = tl.load(off_ptr + b)
    # queries before t_first see none of these keys; start on a BLOCK_T boundary to share _rows
    t_first = tl.maximum(pid_s * BLOCK_S - q_off, 0)
    dk = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    for pid_t in range(t_first // BLOCK_T, tl.cdiv(S, BLOCK_T)):
        t_m, h_m, m_mask = _rows(pid_t, S, H, BLOCK_T, BLOCK_H)
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
        vis = m_mask[:, None] & s_mask[None, :] & (offs_s[None, :] <= (q_off + t_m)[:, None])
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


def _bwd_blocks(H: int, D: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_T for dq, BLOCK_T for dk, BLOCK_S, BLOCK_H, BLOCK_D, num_warps) for the backward kernels."""
    block_h = next_pow2(H)
    block_d = next_pow2(D)
    if interpreting():
        return 2, 1, 16, block_h, block_d, 4
    # dq: 128 (query, head) rows x D = 128 fp32 accumulator, 64 registers a thread at 8 warps. dk holds
    # its [BLOCK_S, D] accumulator and the key tile besides: 64 rows (one query of 64 index heads) keep
    # it within 255 registers at V3.2 shapes (128 rows spill ~300 B/thread; see cuda_compile)
    return max(1, 128 // block_h), max(1, 64 // block_h), 64 if block_d <= 128 else 32, block_h, block_d, 8


def indexer_bwd(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, d_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``I = sum_h w * relu(q . k)`` (causal) for incoming ``d_out [B, S, T]``: ``(dq, dk, dw)``
    in the inputs' dtypes. Never materialises ``[B, S, H, T]``; entries of ``d_out`` at future keys
    are ignored (the forward wrote constant ``-inf`` there)."""
    B, S, H, D = q.shape
    T = k.shape[1]
    dq = torch.empty((B, S, H, D), dtype=torch.float32, device=q.device)
    dw = torch.empty((B, S, H), dtype=torch.float32, device=q.device)
    dk = torch.empty((B, T, D), dtype=torch.float32, device=q.device)
    if B * S * H == 0 or T == 0:
        return dq.zero_().to(q.dtype), dk.zero_().to(k.dtype), dw.zero_().to(w.dtype)
    bt_dq, bt_dk, block_s, block_h, block_d, warps = _bwd_blocks(H, D)
    args = (S, T, H, D, *q.stride(), *k.stride(), *w.stride(), *d_out.stride())
    meta = dict(**dot_flags(q.dtype), BLOCK_S=block_s, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=warps)
    _indexer_bwd_dq_kernel[(triton.cdiv(S, bt_dq), B)](
        q, k, w, d_out, offsets, dq, dw, *args, BLOCK_T=bt_dq, **meta
    )
    _indexer_bwd_dk_kernel[(triton.cdiv(T, block_s), B)](
        q, k, w, d_out, offsets, dk, *args, BLOCK_T=bt_dk, **meta
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
    ) -> torch.Tensor:
        ctx.save_for_backward(q, k, w, offsets)
        return launch_indexer(q, k, w, offsets)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, d_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        q, k, w, offsets = ctx.saved_tensors  # type: ignore[attr-defined]
        dq, dk, dw = indexer_bwd(q, k, w, offsets, d_out)
        return dq, dk, dw, None
