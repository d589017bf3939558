"""Triton kernels for sparse MLA attention (absorbed / MQA form), forward and backward.

Each query attends only to its selected latent rows ``kv[idx[t, :]]`` (``D = d_v + rope`` values per
row, shared by all heads; values are the first ``d_v``). One program owns one query token and a block
of heads: per chunk of ``BLOCK_K`` indices it gathers the rows once, splits them into the latent part
``[BLOCK_K, d_v]`` (used as key and value) and the rope part, and runs an online softmax in base 2.
All-invalid rows give ``out = 0``, ``lse = -inf``.

Backward recomputes the probabilities from the saved ``lse`` (no [S, H, K] storage): ``dq`` is owned
by the program and written once; ``dkv`` rows are shared by many queries, so the key and value
gradients of each gathered chunk are scattered with fp32 atomic adds (order-dependent in the last
bits, like every scatter-based attention backward). ``dlse`` is supported (it folds into ``delta``).

Run the checks: ``TRITON_INTERPRET=1 pytest kernels/tests/test_kernels_sparse_mla.py``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dsv.kernels._checks import interpreting, next_pow2
from dsv.kernels._tl import dot_flags, mma

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _sparse_mla_fwd_kernel(
    q_ptr, kv_ptr, idx_ptr, out_ptr, lse_ptr,
    S, T, H, K, D_V, D_R, scale_log2,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kvb, stride_kvt, stride_kvd,
    stride_ib, stride_is, stride_ik,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_lb, stride_ls, stride_lh,
    HAS_ROPE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DR: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = (pid // S).to(tl.int64)
    t = (pid % S).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_dr = tl.arange(0, BLOCK_DR)
    h_mask = offs_h < H
    dv_mask = offs_dv < D_V
    dr_mask = offs_dr < D_R
    q_row = q_ptr + b * stride_qb + t * stride_qs + offs_h[:, None] * stride_qh
    q_nope = tl.load(q_row + offs_dv[None, :] * stride_qd, mask=h_mask[:, None] & dv_mask[None, :], other=0.0)
    if HAS_ROPE:
        q_rope = tl.load(
            q_row + (D_V + offs_dr[None, :]) * stride_qd, mask=h_mask[:, None] & dr_mask[None, :], other=0.0
        )
    kv_base = kv_ptr + b * stride_kvb
    idx_row = idx_ptr + b * stride_ib + t * stride_is
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ids = tl.load(idx_row + offs_k * stride_ik, mask=offs_k < K, other=-1)
        valid = (ids >= 0) & (ids < T)
        rows = kv_base + tl.where(valid, ids, 0).to(tl.int64)[:, None] * stride_kvt
        kv_nope = tl.load(
            rows + offs_dv[None, :] * stride_kvd, mask=valid[:, None] & dv_mask[None, :], other=0.0
        )
        s = mma(q_nope, tl.trans(kv_nope), PREC, UPCAST)  # (BLOCK_H, BLOCK_K)
        if HAS_ROPE:
            kv_rope = tl.load(
                rows + (D_V + offs_dr[None, :]) * stride_kvd,
                mask=valid[:, None] & dr_mask[None, :],
                other=0.0,
            )
            s += mma(q_rope, tl.trans(kv_rope), PREC, UPCAST)
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + mma(p.to(kv_nope.dtype), kv_nope, PREC, UPCAST)
        m_i = m_new
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    o_ptrs = (
        out_ptr + b * stride_ob + t * stride_os + offs_h[:, None] * stride_oh + offs_dv[None, :] * stride_od
    )
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=h_mask[:, None] & dv_mask[None, :])
    tl.store(lse_ptr + b * stride_lb + t * stride_ls + offs_h * stride_lh, lse, mask=h_mask)


@triton.jit
def _sparse_mla_bwd_kernel(
    q_ptr, kv_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dkv_ptr,
    S, T, H, K, D_V, D_R, sm_scale, scale_log2,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kvb, stride_kvt, stride_kvd,
    stride_ib, stride_is, stride_ik,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_lb, stride_ls, stride_lh,
    HAS_ROPE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DR: tl.constexpr,
):  # fmt: skip
    # dq and dkv are fp32 buffers with q's / kv's contiguous layout
    pid = tl.program_id(0)
    b = (pid // S).to(tl.int64)
    t = (pid % S).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_dr = tl.arange(0, BLOCK_DR)
    h_mask = offs_h < H
    dv_mask = offs_dv < D_V
    dr_mask = offs_dr < D_R
    D = D_V + D_R
    q_row = q_ptr + b * stride_qb + t * stride_qs + offs_h[:, None] * stride_qh
    q_nope = tl.load(q_row + offs_dv[None, :] * stride_qd, mask=h_mask[:, None] & dv_mask[None, :], other=0.0)
    do = tl.load(
        do_ptr
        + b * stride_dob
        + t * stride_dos
        + offs_h[:, None] * stride_doh
        + offs_dv[None, :] * stride_dod,
        mask=h_mask[:, None] & dv_mask[None, :],
        other=0.0,
    ).to(q_nope.dtype)
    if HAS_ROPE:
        q_rope = tl.load(
            q_row + (D_V + offs_dr[None, :]) * stride_qd, mask=h_mask[:, None] & dr_mask[None, :], other=0.0
        )
        dq_rope = tl.zeros([BLOCK_H, BLOCK_DR], tl.float32)
    l_off = b * stride_lb + t * stride_ls + offs_h * stride_lh
    lse2 = tl.load(lse_ptr + l_off, mask=h_mask, other=float("-inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + l_off, mask=h_mask, other=0.0)
    dq_nope = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    kv_base = kv_ptr + b * stride_kvb
    dkv_base = dkv_ptr + b * T * D
    idx_row = idx_ptr + b * stride_ib + t * stride_is
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ids = tl.load(idx_row + offs_k * stride_ik, mask=offs_k < K, other=-1)
        valid = (ids >= 0) & (ids < T)
        ids_safe = tl.where(valid, ids, 0).to(tl.int64)
        rows = kv_base + ids_safe[:, None] * stride_kvt
        kv_nope = tl.load(
            rows + offs_dv[None, :] * stride_kvd, mask=valid[:, None] & dv_mask[None, :], other=0.0
        )
        s = mma(q_nope, tl.trans(kv_nope), PREC, UPCAST)
        if HAS_ROPE:
            kv_rope = tl.load(
                rows + (D_V + offs_dr[None, :]) * stride_kvd,
                mask=valid[:, None] & dr_mask[None, :],
                other=0.0,
            )
            s += mma(q_rope, tl.trans(kv_rope), PREC, UPCAST)
        ok = valid[None, :] & h_mask[:, None]
        p = tl.where(
            ok, tl.exp2(s * scale_log2 - tl.where(ok, lse2[:, None], 0.0)), 0.0
        )  # (BLOCK_H, BLOCK_K)
        dp = mma(do, tl.trans(kv_nope), PREC, UPCAST)
        ds = p * (dp - delta[:, None])  # d loss / d logit (before sm_scale)
        ds_c = ds.to(kv_nope.dtype)
        dq_nope += mma(ds_c, kv_nope, PREC, UPCAST)
        dk_nope = mma(tl.trans(ds_c), q_nope, PREC, UPCAST) * sm_scale
        dv = mma(tl.trans(p.to(do.dtype)), do, PREC, UPCAST)
        d_rows = dkv_base + ids_safe[:, None] * D
        tl.atomic_add(d_rows + offs_dv[None, :], dk_nope + dv, mask=valid[:, None] & dv_mask[None, :])
        if HAS_ROPE:
            dq_rope += mma(ds_c, kv_rope, PREC, UPCAST)
            dk_rope = mma(tl.trans(ds_c), q_rope, PREC, UPCAST) * sm_scale
            tl.atomic_add(d_rows + D_V + offs_dr[None, :], dk_rope, mask=valid[:, None] & dr_mask[None, :])
    dq_row = dq_ptr + ((b * S + t) * H + offs_h[:, None]) * D
    tl.store(dq_row + offs_dv[None, :], dq_nope * sm_scale, mask=h_mask[:, None] & dv_mask[None, :])
    if HAS_ROPE:
        tl.store(dq_row + D_V + offs_dr[None, :], dq_rope * sm_scale, mask=h_mask[:, None] & dr_mask[None, :])


def _blocks(H: int, d_v: int, d_r: int) -> tuple[int, int, int, int]:
    block_dv = next_pow2(d_v)
    block_dr = next_pow2(d_r)
    if interpreting():
        return next_pow2(min(H, 16)), 16, block_dv, block_dr
    # acc is (BLOCK_H, BLOCK_DV) fp32 in registers: 32 heads x 512 latent fits 8 warps
    block_h = next_pow2(min(H, 64 if block_dv <= 256 else 32))
    return block_h, 32 if block_dv >= 512 else 64, block_dv, block_dr


def sparse_mla_fwd(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sm_scale: float, d_v: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on validated inputs -> ``(out [B,S,H,d_v] q.dtype, lse [B,S,H] fp32)``."""
    B, S, H, D = q.shape
    T, K = kv.shape[1], idx.shape[-1]
    out = torch.empty((B, S, H, d_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, S, H), dtype=torch.float32, device=q.device)
    if B * S * H == 0:
        return out, lse
    block_h, block_k, block_dv, block_dr = _blocks(H, d_v, D - d_v)
    grid = (B * S, triton.cdiv(H, block_h))
    _sparse_mla_fwd_kernel[grid](
        q, kv, idx, out, lse,
        S, T, H, K, d_v, D - d_v, sm_scale * LOG2E,
        *q.stride(), *kv.stride(), *idx.stride(), *out.stride(), *lse.stride(),
        HAS_ROPE=d_v < D, **dot_flags(q.dtype),
        BLOCK_H=block_h, BLOCK_K=block_k, BLOCK_DV=block_dv, BLOCK_DR=block_dr,
        num_warps=8 if block_dv >= 256 else 4,
    )  # fmt: skip
    return out, lse


def sparse_mla_bwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    idx: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor,
    dlse: torch.Tensor | None,
    sm_scale: float,
    d_v: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward -> ``(dq, dkv)`` in q's / kv's dtype."""
    B, S, H, D = q.shape
    T, K = kv.shape[1], idx.shape[-1]
    # delta = rowsum(dO * O) - dlse: the softmax-backward correction, (B, S, H) fp32
    delta = (dout.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - torch.where(torch.isfinite(lse), dlse.float(), torch.zeros_like(delta))
    delta = delta.contiguous()
    dq = torch.empty((B, S, H, D), dtype=torch.float32, device=q.device)
    dkv = torch.zeros((B, T, D), dtype=torch.float32, device=q.device)
    if B * S * H == 0:
        return dq.to(q.dtype), dkv.to(kv.dtype)
    block_h, block_k, block_dv, block_dr = _blocks(H, d_v, D - d_v)
    grid = (B * S, triton.cdiv(H, block_h))
    _sparse_mla_bwd_kernel[grid](
        q, kv, idx, dout, lse, delta, dq, dkv,
        S, T, H, K, d_v, D - d_v, sm_scale, sm_scale * LOG2E,
        *q.stride(), *kv.stride(), *idx.stride(), *dout.stride(), *lse.stride(),
        HAS_ROPE=d_v < D, **dot_flags(q.dtype),
        BLOCK_H=block_h, BLOCK_K=block_k, BLOCK_DV=block_dv, BLOCK_DR=block_dr,
        num_warps=8 if block_dv >= 256 else 4,
    )  # fmt: skip
    return dq.to(q.dtype), dkv.to(kv.dtype)


class SparseMLA(torch.autograd.Function):
    """Autograd wrapper: Triton forward, Triton backward for ``q`` and ``kv`` (``idx`` gets no gradient)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        kv: torch.Tensor,
        idx: torch.Tensor,
        sm_scale: float,
        d_v: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = sparse_mla_fwd(q, kv, idx, sm_scale, d_v)
        ctx.save_for_backward(q, kv, idx, out, lse)
        ctx.sm_scale = sm_scale
        ctx.d_v = d_v
        return out, lse

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, dout: torch.Tensor | None, dlse: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        q, kv, idx, out, lse = ctx.saved_tensors  # type: ignore[attr-defined]
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dkv = sparse_mla_bwd(q, kv, idx, out, lse, dout, dlse, ctx.sm_scale, ctx.d_v)  # type: ignore[attr-defined]
        return dq, dkv, None, None, None


def default_sm_scale(d_qk: int) -> float:
    """``1 / sqrt(d_qk)``, for callers that do not fold YaRN's mscale in."""
    return 1.0 / math.sqrt(d_qk)
