"""Triton kernels for the indexer distillation loss ``mean_t KL(p_t || softmax(I_t))`` (V3.2-Exp §2.1).

``p_t`` is the main attention (absorbed form: ``q [B,S,H,D]`` against the shared latent rows
``kv [B,T,D]``) summed over heads and L1-normalised. Dense warm-up: each head's softmax runs over all
visible keys, ``p [B,S,T]``. Sparse stage: the main attention itself only sees the selection, so each
head's softmax runs over the selected keys ``idx [B,S,K]`` and ``p [B,S,K]``; cost O(S·K), no pass
over the whole context. Three launches, none of which materialises the ``[B, H, S, T]`` attention:

1. ``_attn_lse_kernel`` — per (query, head block) the log-sum-exp of the attention logits over the
   causal prefix (dense) or the gathered selection (sparse), streaming key tiles as a flash forward
   does. Skipped when the caller passes the main attention's ``lse`` (``sparse_mla`` returns it).
2. ``_probs_kernel`` — per (query, block of positions) the head-summed probabilities
   ``sum_h exp(s_h - lse_h) / H``, recomputed tile by tile. Output ``[B, S, N]``, N = T or K.
3. ``_kl_row_kernel`` — per row: renormalise ``p``, log-sum-exp of the scores, the KL term and the
   gradient ``(softmax(I) * sum(p) - p) / rows`` in the same pass, so backward is one multiply.

Only the index scores receive gradient (the target is computed without gradient, as in the paper).

Run the checks: ``TRITON_INTERPRET=1 pytest kernels/tests/test_kernels_indexer_kl.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv.kernels._checks import interpreting, next_pow2
from dsv.kernels._tl import device_fn, dot_flags, mma

LOG2E = 1.4426950408889634
# (64 heads x 64 keys) logits tile plus the gathered rows' pointers: 4 warps need > 255 registers a
# thread and spill at V3.2 shapes, 8 warps fit (about 220, no spill; see dsv.kernels.cuda_compile)
_NUM_WARPS = 8
KL_BLOCK_N = 1024  # one row of scores streamed in 1024-wide chunks (4 KiB of fp32)


@device_fn
def _logits_tile(
    q_row, kv_base, offs_h, h_mask, ids, valid, D, stride_qh, stride_qd, stride_kvt, stride_kvd,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # (BLOCK_H, BLOCK_N) = q[h] . kv[ids], the head dim walked in BLOCK_D chunks (D = 576 is not a power of 2)
    s = tl.zeros([BLOCK_H, BLOCK_N], tl.float32)
    rows = kv_base + tl.where(valid, ids, 0).to(tl.int64)[:, None] * stride_kvt
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        q = tl.load(
            q_row + offs_h[:, None] * stride_qh + offs_d[None, :] * stride_qd,
            mask=h_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        k = tl.load(rows + offs_d[None, :] * stride_kvd, mask=valid[:, None] & d_mask[None, :], other=0.0)
        s += mma(q, tl.trans(k), PREC, UPCAST)
    return s


@triton.jit
def _attn_lse_kernel(
    q_ptr, kv_ptr, idx_ptr, off_ptr, lse_ptr,
    S, T, H, D, K, scale_log2,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kvb, stride_kvt, stride_kvd,
    stride_ib, stride_is, stride_ik,
    SPARSE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # lse_ptr: contiguous (B, S, H) fp32, base-2 log-sum-exp of the scaled logits over the visible keys
    # (dense) or over the selected ones (sparse: the sparse main attention's own normaliser)
    pid = tl.program_id(0)
    b = (pid // S).to(tl.int64)
    t = (pid % S).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    q_row = q_ptr + b * stride_qb + t * stride_qs
    kv_base = kv_ptr + b * stride_kvb
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    if SPARSE:
        end = K
    else:
        end = tl.minimum(T, tl.load(off_ptr + b) + t + 1)
    for n0 in range(0, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if SPARSE:
            ids = tl.load(
                idx_ptr + b * stride_ib + t * stride_is + offs_n * stride_ik, mask=offs_n < K, other=-1
            )
            valid = (ids >= 0) & (ids < T)
        else:
            ids = offs_n
            valid = ids < end
        s = _logits_tile(q_row, kv_base, offs_h, h_mask, ids, valid, D, stride_qh, stride_qd, stride_kvt, stride_kvd,
                         BLOCK_H, BLOCK_N, BLOCK_D, PREC, UPCAST)  # fmt: skip
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m_i = m_new
    lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.where(l_i > 0.0, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + (b * S + t) * H + offs_h, lse, mask=h_mask)


@triton.jit
def _probs_kernel(
    q_ptr, kv_ptr, idx_ptr, off_ptr, lse_ptr, p_ptr,
    S, T, H, D, N, scale_log2,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kvb, stride_kvt, stride_kvd,
    stride_ib, stride_is, stride_ik,
    SPARSE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    # p_ptr: contiguous (B, S, N) fp32 head-summed probabilities / H (0 on masked positions)
    pid = tl.program_id(0)
    b = (pid // S).to(tl.int64)
    t = (pid % S).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if SPARSE:
        ids = tl.load(idx_ptr + b * stride_ib + t * stride_is + offs_n * stride_ik, mask=n_mask, other=-1)
        # the sparse main attention sees exactly the selection (FlashMLA's convention: -1 or >= T is
        # "no key"); causality is the selector's business, as in sparse_mla
        valid = n_mask & (ids >= 0) & (ids < T)
    else:
        ids = offs_n
        valid = n_mask & (ids < T) & (ids <= tl.load(off_ptr + b) + t)
    q_row = q_ptr + b * stride_qb + t * stride_qs
    kv_base = kv_ptr + b * stride_kvb
    acc = tl.zeros([BLOCK_N], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        s = _logits_tile(q_row, kv_base, offs_h, h_mask, ids, valid, D, stride_qh, stride_qd, stride_kvt, stride_kvd,
                         BLOCK_H, BLOCK_N, BLOCK_D, PREC, UPCAST)  # fmt: skip
        lse = tl.load(lse_ptr + (b * S + t) * H + offs_h, mask=h_mask, other=0.0)
        ok = h_mask[:, None] & valid[None, :]
        acc += tl.sum(tl.where(ok, tl.exp2(s * scale_log2 - lse[:, None]), 0.0), axis=0)
    tl.store(p_ptr + (b * S + t) * N + offs_n, acc / H, mask=n_mask)


@triton.jit
def _kl_row_kernel(
    p_ptr, x_ptr, kl_ptr, grad_ptr, N, inv_rows, eps, WRITE_GRAD: tl.constexpr, BLOCK_N: tl.constexpr
):
    # p_ptr, x_ptr, grad_ptr: contiguous (R, N) fp32; kl_ptr: (R,)
    row = tl.program_id(0).to(tl.int64)
    p_row = p_ptr + row * N
    x_row = x_ptr + row * N
    m_i = tl.full([], float("-inf"), tl.float32)
    l_i = tl.zeros([], tl.float32)
    z = tl.zeros([], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        mask = offs < N
        x = tl.load(x_row + offs, mask=mask, other=float("-inf"))
        z += tl.sum(tl.load(p_row + offs, mask=mask, other=0.0), axis=0)
        m_new = tl.maximum(m_i, tl.max(x, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
        m_i = m_new
    lse = m_i + tl.log(l_i)
    z_safe = tl.maximum(z, 1e-20)
    p_total = z / z_safe  # sum of the renormalised p: 1, or 0 for a row with no attention mass
    kl = tl.zeros([], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        mask = offs < N
        x = tl.load(x_row + offs, mask=mask, other=float("-inf"))
        p = tl.load(p_row + offs, mask=mask, other=0.0) / z_safe
        pos = p > 0.0
        kl += tl.sum(tl.where(pos, p * (tl.log(p + eps) - (x - lse)), 0.0), axis=0)
        if WRITE_GRAD:
            # a row without attention mass (every pick invalid) has no target: gradient 0, not NaN
            g = (tl.where(p_total > 0.0, tl.exp(x - lse), 0.0) * p_total - p) * inv_rows
            tl.store(grad_ptr + row * N + offs, g, mask=mask)
    tl.store(kl_ptr + row, kl)


def _blocks(H: int, D: int) -> tuple[int, int, int]:
    if interpreting():
        return next_pow2(min(H, 16)), 16, 32
    return next_pow2(min(H, 64)), 64, 64


def head_summed_probs(
    q: torch.Tensor,
    kv: torch.Tensor,
    sm_scale: float,
    offsets: torch.Tensor,
    idx: torch.Tensor | None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-summed main-attention probabilities / H: dense over all visible keys (``[B,S,T]``, per-head
    softmax over the causal prefix) or sparse (``[B,S,K]``, per-head softmax over the selection ``idx``).

    Each row sums to 1 (0 for a sparse row with no valid pick). ``lse`` (natural log, ``[B,S,H]``, the
    main attention's own normaliser over the same keys, e.g. ``sparse_mla``'s second output) skips the
    log-sum-exp pass.
    """
    B, S, H, D = q.shape
    T = kv.shape[1]
    N = T if idx is None else idx.shape[-1]
    block_h, block_n, block_d = _blocks(H, D)
    flags = dot_flags(q.dtype)
    p = torch.empty((B, S, N), dtype=torch.float32, device=q.device)
    if B * S * H == 0 or N == 0:
        return p.zero_()
    scale_log2 = sm_scale * LOG2E
    ix = idx if idx is not None else offsets.view(1, 1, -1)  # any int tensor when dense
    if lse is None:
        lse2 = torch.empty((B, S, H), dtype=torch.float32, device=q.device)
        _attn_lse_kernel[(B * S, triton.cdiv(H, block_h))](
            q, kv, ix, offsets, lse2, S, T, H, D, N, scale_log2, *q.stride(), *kv.stride(), *ix.stride(),
            SPARSE=idx is not None, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d, **flags,
            num_warps=_NUM_WARPS,
        )  # fmt: skip
    else:
        lse2 = (lse.float() * LOG2E).contiguous()  # the kernels work in base 2
    _probs_kernel[(B * S, triton.cdiv(N, block_n))](
        q, kv, ix, offsets, lse2, p, S, T, H, D, N, scale_log2, *q.stride(), *kv.stride(), *ix.stride(),
        SPARSE=idx is not None, BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_D=block_d, **flags,
        num_warps=_NUM_WARPS,
    )  # fmt: skip
    return p


def kl_rows(
    p: torch.Tensor, scores: torch.Tensor, *, write_grad: bool, eps: float = 1e-10
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row KL of contiguous fp32 ``p [R, N]`` vs ``softmax(scores [R, N])`` and, optionally, the
    gradient of the mean over rows with respect to ``scores``."""
    R, N = p.shape
    kl = torch.empty((R,), dtype=torch.float32, device=p.device)
    grad = torch.empty((R, N), dtype=torch.float32, device=p.device) if write_grad else kl
    if R == 0:
        return kl, (grad if write_grad else None)
    block_n = 64 if interpreting() else KL_BLOCK_N
    _kl_row_kernel[(R,)](p, scores, kl, grad, N, 1.0 / R, eps, WRITE_GRAD=write_grad, BLOCK_N=block_n)
    return kl, (grad if write_grad else None)


class IndexerKL(torch.autograd.Function):
    """Loss forward with the kernels above; the gradient (into ``index_scores`` only) is computed in the
    forward row pass and scaled by the incoming gradient in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        index_scores: torch.Tensor,
        q: torch.Tensor,
        kv: torch.Tensor,
        idx: torch.Tensor | None,
        sm_scale: float,
        offsets: torch.Tensor,
        lse: torch.Tensor | None,
    ) -> torch.Tensor:
        B, S, T = index_scores.shape
        p = head_summed_probs(q, kv, sm_scale, offsets, idx, lse)  # (B, S, N)
        x = index_scores.detach().float()
        if idx is not None:
            valid = (idx >= 0) & (idx < T)
            x = torch.gather(x, -1, idx.long().clamp(0, max(T - 1, 0))).masked_fill(~valid, float("-inf"))
        N = p.shape[-1]
        need_grad = ctx.needs_input_grad[0]  # type: ignore[attr-defined]
        kl, grad = kl_rows(p.view(B * S, N), x.contiguous().view(B * S, N), write_grad=need_grad)
        if need_grad:
            assert grad is not None
            grad = grad.view(B, S, N)
            if idx is not None:
                full = torch.zeros((B, S, T), dtype=torch.float32, device=grad.device)
                grad = full.scatter_add_(
                    -1, idx.long().clamp(0, max(T - 1, 0)), grad.masked_fill(~valid, 0.0)
                )
            ctx.save_for_backward(grad)
        ctx.scores_dtype = index_scores.dtype  # type: ignore[attr-defined]
        return kl.mean() if kl.numel() else kl.sum() * float("nan")

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, g: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return (grad * g).to(ctx.scores_dtype), None, None, None, None, None, None  # type: ignore[attr-defined]
