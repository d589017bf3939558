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
from dsv.kernels._tl import dot_flags, mma


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
        t = pid_t * BLOCK_T + i
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


class IndexerScores(torch.autograd.Function):
    """Triton forward; backward (for the dense warm-up, where the indexer trains on its KL loss)
    recomputes ``relu'`` from ``q . k`` with torch ops, one query chunk at a time so the
    ``[chunk, H, T]`` logits stay bounded."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        w: torch.Tensor,
        offsets: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(q, k, w)
        return launch_indexer(q, k, w, offsets)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, d_out: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        q, k, w = ctx.saved_tensors  # type: ignore[attr-defined]
        B, S, H, D = q.shape
        T = k.shape[1]
        kf = k.float()
        dq = torch.empty((B, S, H, D), dtype=torch.float32, device=q.device)
        dw = torch.empty((B, S, H), dtype=torch.float32, device=q.device)
        dk = torch.zeros((B, T, D), dtype=torch.float32, device=q.device)
        # masked (future) entries are constant -inf: their incoming gradient must not leak
        g_all = d_out.float().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        chunk = max(1, (1 << 24) // max(1, B * H * T))
        for s0 in range(0, S, chunk):
            sl = slice(s0, min(S, s0 + chunk))
            qs = q[:, sl].float()
            logits = torch.einsum("bshd,btd->bsht", qs, kf)  # (B, s, H, T)
            g = g_all[:, sl].unsqueeze(2)  # (B, s, 1, T)
            dw[:, sl] = (g * logits.clamp_min(0)).sum(-1)
            dlog = g * w[:, sl].float().unsqueeze(-1) * (logits > 0)
            dq[:, sl] = torch.einsum("bsht,btd->bshd", dlog, kf)
            dk += torch.einsum("bsht,bshd->btd", dlog, qs)
        return dq.to(q.dtype), dk.to(k.dtype), dw.to(w.dtype), None
