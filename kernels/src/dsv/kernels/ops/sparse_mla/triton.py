"""Triton kernels for sparse MLA attention (absorbed / MQA form), forward and backward.

Each query attends only to its selected latent rows ``kv[idx[t, :]]`` (``D = d_v + rope`` values per
row, shared by all heads; values are the first ``d_v``). A forward program owns one query token, a
block of 64 heads (the wgmma tile height) and one part of the value columns: per chunk of
``BLOCK_K`` picks it gathers the rows once, computes q.k over the whole latent + rope and runs an
online softmax in base 2, accumulating its own value columns. Programs are numbered with the head
block fastest, then the value part, then the split, then the token, so one token's programs run
side by side and share its gathered rows in L2. All-invalid rows give ``out = 0``, ``lse = -inf``.

Split-KV (decode): with few tokens, each token's picks are cut into ``num_splits`` ranges, each
program writes an fp32 partial ``(out, lse)`` and ``_sparse_mla_combine_kernel`` merges them with
log-sum-exp weights (a split without a valid pick has ``lse = -inf`` and weight 0). FP8 cache: the
same forward reads the 656-byte rows of :mod:`.kv_fp8` and dequantises each 128-column block in
registers.

Backward recomputes the probabilities from the saved ``lse`` (no [S, H, K] storage) in two kernels,
so that every product has wgmma's 64-row tiles: ``_sparse_mla_bwd_dq_kernel`` has the heads as the
rows (like the forward) and writes its ``dq`` rows once; ``_sparse_mla_bwd_dkv_kernel`` has a token's
picks as the rows and, per block of heads, emits the key/value gradient ``p^T dO + ds^T q`` (sm_scale
folded into ``ds``) in 64-column slices, either scattered with fp32 atomic adds (order-dependent in
the last bits) or, with ``deterministic=True``, stored per (token, head block, pick) and reduced in
query order by ``_dkv_ordered_reduce_kernel``. ``dlse`` is supported (it folds into ``delta``).

Block sizes and why they compile without spills: :func:`_blocks`, :func:`_bwd_blocks` (checked by
``python -m dsv.kernels.cuda_compile --only sparse_mla``). Run the checks: ``pytest
kernels/tests/test_kernels_sparse_mla.py kernels/tests/test_kernels_sparse_mla_v2.py``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dsv.kernels._checks import interpreting, next_pow2
from dsv.kernels._tl import device_fn, dot_flags, mma
from dsv.kernels.ops.sparse_mla.kv_fp8 import kv_fp8_views

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@device_fn
def _mma_acc(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # mma with an accumulator: chains two products into one fp32 tile (one live accumulator)
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PREC)


@device_fn
def _col_mask(cols, D_V, EVEN_DV: tl.constexpr):
    # a constant all-true mask when the block is exactly filled: masks fold away and loads vectorise
    if EVEN_DV:
        return cols >= 0
    return cols < D_V


@device_fn
def _load_latent(rows, sc_rows, cols, g0, valid, col_mask, dtype, FP8: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_DV: tl.constexpr):  # fmt: skip
    # (BLOCK_K, BLOCK_DV) latent columns ``cols`` (starting at 128-block g0) of the gathered rows, in
    # ``dtype``. FP8 rows are dequantised per 128-block: one (BLOCK_K, 1) scale load per block and a
    # select, which costs far fewer registers than a per-element scale gather or a reshape to
    # (BLOCK_K, G, 128)
    x = tl.load(rows + cols[None, :], mask=valid[:, None] & col_mask[None, :], other=0.0)
    if FP8:
        x = x.to(tl.float32)
        blk = (cols // 128 - g0)[None, :]
        for g in tl.static_range(BLOCK_DV // 128):
            sc_g = tl.load(sc_rows + (g0 + g), mask=valid[:, None], other=0.0)  # (BLOCK_K, 1)
            x = tl.where(blk == g, x * sc_g, x)
    return x.to(dtype)


@triton.jit
def _sparse_mla_fwd_kernel(
    q_ptr, kv_ptr, kvs_ptr, kvr_ptr, idx_ptr, out_ptr, lse_ptr,
    S, T, H, K, D_V, D_R, scale_log2, N_HB, N_SPLIT, SPLIT_LEN,
    stride_qb, stride_qs, stride_qh,
    stride_kvb, stride_kvt,
    stride_ksb, stride_kst,
    stride_krb, stride_krt,
    stride_ib, stride_is, stride_ik,
    stride_ob, stride_os, stride_oc, stride_oh,
    stride_lb, stride_ls, stride_lc, stride_lh,
    HAS_ROPE: tl.constexpr, FP8: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    ALIGNED: tl.constexpr, EVEN_DV: tl.constexpr, EVEN_DR: tl.constexpr, DV_PARTS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DR: tl.constexpr,
):  # fmt: skip
    # program -> (token, split, value half, head block), head block fastest: the programs of one
    # token (its heads, halves and splits) run side by side and share its gathered rows in L2.
    # With DV_PARTS = 2 or 4 a program owns BLOCK_DV of the DV_PARTS * BLOCK_DV value columns ("own");
    # q.k still runs over the whole latent (own + the other parts o1..o3 + rope).
    pid = tl.program_id(0)
    hb = pid % N_HB
    rest = pid // N_HB
    part = rest % DV_PARTS
    rest = rest // DV_PARTS
    split = rest % N_SPLIT
    bt = rest // N_SPLIT
    b = (bt // S).to(tl.int64)
    t = (bt % S).to(tl.int64)
    k_lo = split * SPLIT_LEN
    k_hi = tl.minimum(k_lo + SPLIT_LEN, K)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    own = part * BLOCK_DV + tl.arange(0, BLOCK_DV)
    p1 = (part + 1) % DV_PARTS
    p2 = (part + 2) % DV_PARTS
    p3 = (part + 3) % DV_PARTS
    o1 = p1 * BLOCK_DV + tl.arange(0, BLOCK_DV)
    o2 = p2 * BLOCK_DV + tl.arange(0, BLOCK_DV)
    o3 = p3 * BLOCK_DV + tl.arange(0, BLOCK_DV)
    offs_dr = tl.arange(0, BLOCK_DR)
    h_mask = offs_h < H
    own_mask = _col_mask(own, D_V, EVEN_DV)
    o1_mask = _col_mask(o1, D_V, EVEN_DV)
    o2_mask = _col_mask(o2, D_V, EVEN_DV)
    o3_mask = _col_mask(o3, D_V, EVEN_DV)
    dr_mask = _col_mask(offs_dr, D_R, EVEN_DR)
    q_row = q_ptr + b * stride_qb + t * stride_qs + offs_h * stride_qh
    if ALIGNED:
        q_row = tl.multiple_of(q_row, 16)
    q_row = q_row[:, None]
    q_own = tl.load(q_row + own[None, :], mask=h_mask[:, None] & own_mask[None, :], other=0.0)
    if DV_PARTS >= 2:
        q_1 = tl.load(q_row + o1[None, :], mask=h_mask[:, None] & o1_mask[None, :], other=0.0)
    if DV_PARTS == 4:
        q_2 = tl.load(q_row + o2[None, :], mask=h_mask[:, None] & o2_mask[None, :], other=0.0)
        q_3 = tl.load(q_row + o3[None, :], mask=h_mask[:, None] & o3_mask[None, :], other=0.0)
    if HAS_ROPE:
        q_rope = tl.load(q_row + (D_V + offs_dr[None, :]), mask=h_mask[:, None] & dr_mask[None, :], other=0.0)
    idx_row = idx_ptr + b * stride_ib + t * stride_is
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    G: tl.constexpr = BLOCK_DV // 128  # FP8 scale blocks per part
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ids = tl.load(idx_row + offs_k * stride_ik, mask=offs_k < k_hi, other=-1)
        valid = (ids >= 0) & (ids < T)
        ids_safe = tl.where(valid, ids, 0).to(tl.int64)
        rows = kv_ptr + b * stride_kvb + ids_safe * stride_kvt
        if ALIGNED:
            rows = tl.multiple_of(rows, 16)
        rows = rows[:, None]
        sc_rows = kvs_ptr + b * stride_ksb + ids_safe[:, None] * stride_kst
        kv_own = _load_latent(
            rows, sc_rows, own, part * G, valid, own_mask, q_own.dtype, FP8, BLOCK_K, BLOCK_DV
        )
        s = mma(q_own, tl.trans(kv_own), PREC, UPCAST)  # (BLOCK_H, BLOCK_K)
        if DV_PARTS >= 2:
            kv_1 = _load_latent(
                rows, sc_rows, o1, p1 * G, valid, o1_mask, q_own.dtype, FP8, BLOCK_K, BLOCK_DV
            )
            s = _mma_acc(q_1, tl.trans(kv_1), s, PREC, UPCAST)
        if DV_PARTS == 4:
            kv_2 = _load_latent(
                rows, sc_rows, o2, p2 * G, valid, o2_mask, q_own.dtype, FP8, BLOCK_K, BLOCK_DV
            )
            s = _mma_acc(q_2, tl.trans(kv_2), s, PREC, UPCAST)
            kv_3 = _load_latent(
                rows, sc_rows, o3, p3 * G, valid, o3_mask, q_own.dtype, FP8, BLOCK_K, BLOCK_DV
            )
            s = _mma_acc(q_3, tl.trans(kv_3), s, PREC, UPCAST)
        if HAS_ROPE:
            r_rows = kvr_ptr + b * stride_krb + ids_safe * stride_krt
            if ALIGNED:
                r_rows = tl.multiple_of(r_rows, 16)
            kv_rope = tl.load(
                r_rows[:, None] + offs_dr[None, :], mask=valid[:, None] & dr_mask[None, :], other=0.0
            ).to(q_rope.dtype)
            s = _mma_acc(q_rope, tl.trans(kv_rope), s, PREC, UPCAST)
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = _mma_acc(p.to(kv_own.dtype), kv_own, acc * alpha[:, None], PREC, UPCAST)
        m_i = m_new
    # a split (or a whole row) without a valid pick: out 0, lse -inf; the combine gives it weight 0
    has = l_i > 0.0
    out = acc * (1.0 / tl.where(has, l_i, 1.0))[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    o_row = out_ptr + b * stride_ob + t * stride_os + split * stride_oc + offs_h * stride_oh
    if ALIGNED:
        o_row = tl.multiple_of(o_row, 16)
    tl.store(o_row[:, None] + own[None, :], out.to(out_ptr.dtype.element_ty),
             mask=h_mask[:, None] & own_mask[None, :])  # fmt: skip
    if part == 0:  # one of the value halves writes lse
        tl.store(
            lse_ptr + b * stride_lb + t * stride_ls + split * stride_lc + offs_h * stride_lh, lse, mask=h_mask
        )


@triton.jit
def _sparse_mla_combine_kernel(
    part_ptr, plse_ptr, out_ptr, lse_ptr,
    H, D_V, N_SPLIT, N_HB,
    stride_pr, stride_pc, stride_ph, stride_pd,
    stride_qr, stride_qc, stride_qh,
    stride_or, stride_oh, stride_od,
    stride_lr, stride_lh,
    BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    # merge the per-split (out_s, lse_s) of one token: lse = logsumexp_s lse_s,
    # out = sum_s exp(lse_s - lse) * out_s (a split with lse_s = -inf has weight 0)
    pid = tl.program_id(0)
    r = (pid // N_HB).to(tl.int64)
    offs_h = (pid % N_HB) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_dv = tl.arange(0, BLOCK_DV)
    h_mask = offs_h < H
    dv_mask = offs_dv < D_V
    plse = tl.load(
        plse_ptr + r * stride_qr + offs_c[:, None] * stride_qc + offs_h[None, :] * stride_qh,
        mask=(offs_c[:, None] < N_SPLIT) & h_mask[None, :],
        other=float("-inf"),
    )  # (BLOCK_C, BLOCK_H)
    m = tl.max(plse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp(plse - m_safe[None, :]), axis=0)
    has = total > 0.0
    lse = tl.where(has, m_safe + tl.log(tl.where(has, total, 1.0)), float("-inf"))
    lse_safe = tl.where(has, lse, 0.0)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    for c in range(0, N_SPLIT):
        lse_c = tl.load(plse_ptr + r * stride_qr + c * stride_qc + offs_h * stride_qh, mask=h_mask,
                        other=float("-inf"))  # fmt: skip
        w = tl.where(has, tl.exp(lse_c - lse_safe), 0.0)
        o_c = tl.load(
            part_ptr
            + r * stride_pr
            + c * stride_pc
            + offs_h[:, None] * stride_ph
            + offs_dv[None, :] * stride_pd,
            mask=h_mask[:, None] & dv_mask[None, :] & (w[:, None] > 0.0),
            other=0.0,
        )
        acc += w[:, None] * o_c
    tl.store(
        out_ptr + r * stride_or + offs_h[:, None] * stride_oh + offs_dv[None, :] * stride_od,
        acc.to(out_ptr.dtype.element_ty),
        mask=h_mask[:, None] & dv_mask[None, :],
    )
    tl.store(lse_ptr + r * stride_lr + offs_h * stride_lh, lse, mask=h_mask)


@triton.jit
def _sparse_mla_bwd_dq_kernel(
    q_ptr, kv_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    S, T, H, K, D_V, D_R, sm_scale, scale_log2, N_HB,
    stride_qb, stride_qs, stride_qh,
    stride_kvb, stride_kvt,
    stride_ib, stride_is, stride_ik,
    stride_dob, stride_dos, stride_doh,
    stride_lb, stride_ls, stride_lh,
    HAS_ROPE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    ALIGNED: tl.constexpr, EVEN_DV: tl.constexpr, EVEN_DR: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DR: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    # dq = ds kv with the heads as the tile rows (the forward's shape); dq is an fp32 buffer with q's
    # contiguous layout. program -> (token, head block), head block fastest. Per chunk of picks, s and
    # dp are accumulated over BLOCK_C-column slices of q / dO / the gathered rows (the slices are
    # re-read from L1/L2 per chunk: q and dO held whole spill their load pointers), then one
    # (BLOCK_H, BLOCK_DV) accumulator takes ds kv over all value columns, a second the rope columns.
    pid = tl.program_id(0)
    hb = pid % N_HB
    row = pid // N_HB  # flat query token b * S + t
    b = (row // S).to(tl.int64)
    t = (row % S).to(tl.int64)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    own = tl.arange(0, BLOCK_DV)
    offs_c = tl.arange(0, BLOCK_C)
    offs_dr = tl.arange(0, BLOCK_DR)
    h_mask = offs_h < H
    own_mask = _col_mask(own, D_V, EVEN_DV)
    dr_mask = _col_mask(offs_dr, D_R, EVEN_DR)
    D = D_V + D_R
    q_row = q_ptr + b * stride_qb + t * stride_qs + offs_h * stride_qh
    do_row = do_ptr + b * stride_dob + t * stride_dos + offs_h * stride_doh
    if ALIGNED:
        q_row = tl.multiple_of(q_row, 16)
        do_row = tl.multiple_of(do_row, 16)
    q_row = q_row[:, None]
    do_row = do_row[:, None]
    if HAS_ROPE:
        q_rope = tl.load(q_row + (D_V + offs_dr[None, :]), mask=h_mask[:, None] & dr_mask[None, :], other=0.0)
        dq_rope = tl.zeros([BLOCK_H, BLOCK_DR], tl.float32)
    l_off = b * stride_lb + t * stride_ls + offs_h * stride_lh
    lse2 = tl.load(lse_ptr + l_off, mask=h_mask, other=float("-inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + l_off, mask=h_mask, other=0.0)
    dq_own = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    kv_base = kv_ptr + b * stride_kvb
    idx_row = idx_ptr + b * stride_ib + t * stride_is
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        ids = tl.load(idx_row + offs_k * stride_ik, mask=offs_k < K, other=-1)
        valid = (ids >= 0) & (ids < T)
        ids_safe = tl.where(valid, ids, 0).to(tl.int64)
        rows = kv_base + ids_safe * stride_kvt
        if ALIGNED:
            rows = tl.multiple_of(rows, 16)
        rows = rows[:, None]
        s = tl.zeros([BLOCK_H, BLOCK_K], tl.float32)
        dp = tl.zeros([BLOCK_H, BLOCK_K], tl.float32)
        for c0 in range(0, D_V, BLOCK_C):
            cols = c0 + offs_c
            c_mask = _col_mask(cols, D_V, EVEN_DV)
            kv_c = tl.load(rows + cols[None, :], mask=valid[:, None] & c_mask[None, :], other=0.0)
            qc_mask = h_mask[:, None] & c_mask[None, :]
            q_c = tl.load(q_row + cols[None, :], mask=qc_mask, other=0.0)
            do_c = tl.load(do_row + cols[None, :], mask=qc_mask, other=0.0).to(q_c.dtype)
            s = _mma_acc(q_c, tl.trans(kv_c), s, PREC, UPCAST)
            dp = _mma_acc(do_c, tl.trans(kv_c), dp, PREC, UPCAST)
        if HAS_ROPE:
            kv_rope = tl.load(
                rows + (D_V + offs_dr[None, :]), mask=valid[:, None] & dr_mask[None, :], other=0.0
            )
            s = _mma_acc(q_rope, tl.trans(kv_rope), s, PREC, UPCAST)
        ok = valid[None, :] & h_mask[:, None]
        p = tl.where(ok, tl.exp2(s * scale_log2 - tl.where(ok, lse2[:, None], 0.0)), 0.0)
        # d loss / d (q . k) with sm_scale folded in once, so no product below needs rescaling
        ds = (p * (dp - delta[:, None]) * sm_scale).to(kv_ptr.dtype.element_ty)
        kv_own = tl.load(rows + own[None, :], mask=valid[:, None] & own_mask[None, :], other=0.0)
        dq_own = _mma_acc(ds, kv_own, dq_own, PREC, UPCAST)
        if HAS_ROPE:
            dq_rope = _mma_acc(ds, kv_rope, dq_rope, PREC, UPCAST)
    dq_row = dq_ptr + (row.to(tl.int64) * H + offs_h) * D
    if ALIGNED:  # D % 4 == 0: 16-byte rows, so the stores vectorise
        dq_row = tl.multiple_of(dq_row, 16)
    dq_row = dq_row[:, None]
    tl.store(dq_row + own[None, :], dq_own, mask=h_mask[:, None] & own_mask[None, :])
    if HAS_ROPE:
        tl.store(dq_row + D_V + offs_dr[None, :], dq_rope, mask=h_mask[:, None] & dr_mask[None, :])


@triton.jit
def _sparse_mla_bwd_dkv_kernel(
    q_ptr, kv_ptr, idx_ptr, do_ptr, lse_ptr, delta_ptr, dkv_ptr, part_ptr,
    S, T, H, K, D_V, D_R, sm_scale, scale_log2, N_KB, ROW0,
    stride_qb, stride_qs, stride_qh,
    stride_kvb, stride_kvt,
    stride_ib, stride_is, stride_ik,
    stride_dob, stride_dos, stride_doh,
    stride_lb, stride_ls, stride_lh,
    stride_pr, stride_ph, stride_pk,
    DETERMINISTIC: tl.constexpr, HAS_ROPE: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
    ALIGNED: tl.constexpr, EVEN_DV: tl.constexpr, EVEN_DR: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    # dkv[picks] = p^T dO + ds^T q with the picks as the tile rows. dkv is an fp32 buffer with kv's
    # contiguous layout; part (deterministic mode) is fp32 [rows of this launch, head blocks, K, D]:
    # each (token, head block, pick)'s contribution. program -> (token, block of BLOCK_K picks),
    # pick block fastest: a token's programs run side by side and share its q / dO in L2. Per head
    # block the transposed scores s^T = kv q^T and dp^T = kv_v dO^T are accumulated over BLOCK_C-column
    # slices (nothing (BLOCK_K, 576)-wide is ever live), then dkv is emitted slice by slice.
    pid = tl.program_id(0)
    kb = pid % N_KB
    row = ROW0 + pid // N_KB  # flat query token b * S + t
    b = (row // S).to(tl.int64)
    t = (row % S).to(tl.int64)
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_c = tl.arange(0, BLOCK_C)
    offs_dr = tl.arange(0, BLOCK_DR)
    dr_mask = _col_mask(offs_dr, D_R, EVEN_DR)
    D = D_V + D_R
    ids = tl.load(idx_ptr + b * stride_ib + t * stride_is + offs_k * stride_ik, mask=offs_k < K, other=-1)
    valid = (ids >= 0) & (ids < T)
    ids_safe = tl.where(valid, ids, 0).to(tl.int64)
    rows = kv_ptr + b * stride_kvb + ids_safe * stride_kvt
    d_rows = dkv_ptr + b * T * D + ids_safe * D
    p_rows = part_ptr + (row - ROW0).to(tl.int64) * stride_pr + offs_k.to(tl.int64) * stride_pk
    if ALIGNED:
        rows = tl.multiple_of(rows, 16)
        d_rows = tl.multiple_of(d_rows, 16)
        p_rows = tl.multiple_of(p_rows, 16)
    rows = rows[:, None]
    d_rows = d_rows[:, None]
    p_rows = p_rows[:, None]
    k_store = (offs_k < K)[:, None]
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        q_row = q_ptr + b * stride_qb + t * stride_qs + offs_h * stride_qh
        do_row = do_ptr + b * stride_dob + t * stride_dos + offs_h * stride_doh
        if ALIGNED:
            q_row = tl.multiple_of(q_row, 16)
            do_row = tl.multiple_of(do_row, 16)
        q_row = q_row[:, None]
        do_row = do_row[:, None]
        s_t = tl.zeros([BLOCK_K, BLOCK_H], tl.float32)
        dp_t = tl.zeros([BLOCK_K, BLOCK_H], tl.float32)
        for c0 in range(0, D_V, BLOCK_C):
            cols = c0 + offs_c
            c_mask = _col_mask(cols, D_V, EVEN_DV)
            kv_c = tl.load(rows + cols[None, :], mask=valid[:, None] & c_mask[None, :], other=0.0)
            qc_mask = h_mask[:, None] & c_mask[None, :]
            q_c = tl.load(q_row + cols[None, :], mask=qc_mask, other=0.0)
            do_c = tl.load(do_row + cols[None, :], mask=qc_mask, other=0.0).to(q_c.dtype)
            s_t = _mma_acc(kv_c, tl.trans(q_c), s_t, PREC, UPCAST)
            dp_t = _mma_acc(kv_c, tl.trans(do_c), dp_t, PREC, UPCAST)
        if HAS_ROPE:
            kv_r = tl.load(rows + (D_V + offs_dr[None, :]), mask=valid[:, None] & dr_mask[None, :], other=0.0)
            q_r = tl.load(
                q_row + (D_V + offs_dr[None, :]), mask=h_mask[:, None] & dr_mask[None, :], other=0.0
            )
            s_t = _mma_acc(kv_r, tl.trans(q_r), s_t, PREC, UPCAST)
        l_off = b * stride_lb + t * stride_ls + offs_h * stride_lh
        lse2 = tl.load(lse_ptr + l_off, mask=h_mask, other=float("-inf")) * 1.4426950408889634
        delta = tl.load(delta_ptr + l_off, mask=h_mask, other=0.0)
        ok = valid[:, None] & h_mask[None, :]
        p_t = tl.where(ok, tl.exp2(s_t * scale_log2 - tl.where(ok, lse2[None, :], 0.0)), 0.0)
        ds_t = (p_t * (dp_t - delta[None, :]) * sm_scale).to(kv_ptr.dtype.element_ty)
        p_t = p_t.to(kv_ptr.dtype.element_ty)
        hb_rows = p_rows + (h0 // BLOCK_H) * stride_ph
        # one chained (BLOCK_K, BLOCK_C) accumulator per slice: p^T dO, then + ds^T q
        for c0 in range(0, D_V, BLOCK_C):
            cols = c0 + offs_c
            c_mask = _col_mask(cols, D_V, EVEN_DV)
            qc_mask = h_mask[:, None] & c_mask[None, :]
            q_c = tl.load(q_row + cols[None, :], mask=qc_mask, other=0.0)
            do_c = tl.load(do_row + cols[None, :], mask=qc_mask, other=0.0).to(q_c.dtype)
            dkv_c = _mma_acc(ds_t, q_c, mma(p_t, do_c, PREC, UPCAST), PREC, UPCAST)
            if DETERMINISTIC:
                tl.store(hb_rows + cols[None, :], dkv_c, mask=k_store & c_mask[None, :])
            else:
                tl.atomic_add(d_rows + cols[None, :], dkv_c, mask=valid[:, None] & c_mask[None, :])
        if HAS_ROPE:
            dk_rope = mma(ds_t, q_r, PREC, UPCAST)
            if DETERMINISTIC:
                tl.store(hb_rows + D_V + offs_dr[None, :], dk_rope, mask=k_store & dr_mask[None, :])
            else:
                tl.atomic_add(
                    d_rows + D_V + offs_dr[None, :], dk_rope, mask=valid[:, None] & dr_mask[None, :]
                )


@triton.jit
def _dkv_ordered_reduce_kernel(
    part_ptr, order_ptr, key_ptr, start_ptr, dkv_ptr,
    K, D, N_HB,
    stride_pr, stride_ph, stride_pk,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    # one program per distinct key row of this chunk: add its contributions in query order (order
    # lists flat (row, pick) positions sorted stably by key), head blocks in order, then add the sum
    # to dkv. Every row is owned by one program and chunks run in order: the result is bitwise
    # reproducible.
    u = tl.program_id(0)
    key = tl.load(key_ptr + u)
    lo = tl.load(start_ptr + u)
    hi = tl.load(start_ptr + u + 1)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        acc = tl.zeros([BLOCK_D], tl.float32)
        for j in range(lo, hi):
            f = tl.load(order_ptr + j)
            src = part_ptr + (f // K) * stride_pr + (f % K) * stride_pk + offs_d
            for hb in range(0, N_HB):
                acc += tl.load(src + hb * stride_ph, mask=d_mask, other=0.0)
        dst = dkv_ptr + key * D + offs_d
        tl.store(dst, tl.load(dst, mask=d_mask, other=0.0) + acc, mask=d_mask)


DEFAULT_NUM_SMS = 132  # H100 / H200 SXM; the split heuristic's SM count off CUDA (interpreter tests)
MIN_SPLIT_BLOCKS = 2  # picks per split >= 2 * BLOCK_K: a split's fp32 partial must not outweigh its reads
DET_BUDGET_BYTES = 256 << 20  # deterministic backward: fp32 partial buffer per query chunk


def _blocks(H: int, d_v: int, d_r: int, fp8: bool = False) -> tuple[int, int, int, int, int, int]:
    """Forward ``(BLOCK_H, BLOCK_K, BLOCK_DV, BLOCK_DR, DV_PARTS, num_warps)``.

    64 heads per program: wgmma tiles are 64 rows, so 64 heads is the smallest head block that lets
    Triton use Hopper's wgmma (fewer heads, e.g. under tensor parallelism, shrink it to next_pow2(H)).
    At d_v = 512 a (64, 512) fp32 accumulator (128 registers per thread over 8 warps) plus the
    gathered (BLOCK_K, 576) tile and softmax state spills at every BLOCK_K (measured 296-1700 B with
    BLOCK_K 16-64), so the value columns are split in two 256-column halves across programs
    (DV_PARTS = 2, adjacent in the grid so their gathers hit L2): each program recomputes q.k over
    the whole latent (+53% MMA work) and owns a (64, 256) accumulator. With 32 picks per step, 8
    warps and a 2-stage cp.async pipeline of the gathers this compiles to 237 registers, 0 spills,
    wgmma (64 picks per step still spills 104-224 B). The FP8 cache adds the fp32 dequantisation of each
    gathered tile in registers (it cannot go straight to shared memory): with halves that spills at
    every setting tried (4-312 B), so FP8 splits the values in four 128-column parts, exactly one
    scale block each (the dequantisation is one multiply per row): a (64, 128) accumulator, 64 heads x
    32 picks, 4 warps, 244 registers, 0 spills, wgmma; q.k is recomputed by the 4 parts.
    """
    block_dr = next_pow2(d_r)
    full = next_pow2(d_v)
    if fp8:  # d_v is a multiple of 128: parts of whole scale blocks
        parts = max(1, min(4, full // 128))
    else:
        parts = 2 if full >= 32 else 1
    block_dv = full // parts
    if interpreting():
        return next_pow2(min(H, 16)), 16, block_dv, block_dr, parts, 4
    warps = 4 if fp8 or full < 256 else 8
    return min(64, next_pow2(H)), 32, block_dv, block_dr, parts, warps


FWD_STAGES = 2  # cp.async double-buffering of the gathered rows


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    # the kernels take the innermost stride as 1 (vector loads); copy the rare tensor that is not
    return t if t.stride(-1) == 1 else t.contiguous()


def _aligned16(*tensors: torch.Tensor) -> bool:
    # 16-byte aligned base and rows: Triton's own launch-time specialisation, spelled out as a constexpr
    # so that the offline compile (cuda_compile) sees the vectorised loads a launch gets
    return all(
        t.data_ptr() % 16 == 0 and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1])
        for t in tensors
    )


def _bwd_blocks(
    H: int, d_v: int, d_r: int
) -> tuple[tuple[int, int, int, int, int, int], tuple[int, int, int, int]]:
    """Backward blocks: dq kernel ``(BLOCK_H, BLOCK_K, BLOCK_DV, BLOCK_DR, BLOCK_C, num_warps)``, dkv
    kernel ``(BLOCK_H, BLOCK_K, BLOCK_C, num_warps)``.

    Two kernels so that every product has a 64-row tile (wgmma's height): dq runs with the heads as
    the rows (64 heads x 16 picks per step, like the forward), dkv with a token's picks as the rows
    (64 picks, looping over 64-head blocks). At V3.2 shapes both compile to wgmma without spilling, 8
    warps and 2 stages: dq 239 registers, dkv 216 (218 deterministic). What makes that possible: s and
    dp are accumulated over 64-column slices of q / dO / the gathered rows loaded inside the loop, so
    no (64, 512) operand or its load pointers stay live, and each dkv slice is one chained accumulator
    (p^T dO, then + ds^T q) emitted 64 columns at a time. Measured alternatives: a dq kernel that
    holds q and dO whole (as the forward holds q) spilled 108-2140 B at every setting tried (value
    halves or quarters, 16 or 32 picks, 4 or 8 warps, 1 or 2 stages); dq with 32 picks per step
    spills 28-360 B (it fits with value halves across programs, which recompute s and dp twice); dkv
    with 128 heads or 128 picks per tile spills 80-180 B, with 128-column slices 568 B (deterministic).

    Cost: both kernels compute s = q k^T and dp = dO v^T, 1088 extra multiply-adds per (query, head,
    pick) on top of the 2752 of a backward that computes them once, so the MMA work is 3840 / 2752 =
    1.40x the minimum (as for the 16-head mma.sync kernel this replaces, which recomputed them per
    value half), now on wgmma. The price of the slices is L2 traffic: dq re-reads the 64 x 1024 bf16
    q / dO value columns per 16 picks, dkv twice per 64 x 64 tile (a token's programs run side by
    side, so these hit L2). dkv's fp32 atomics go per 64-head block: 2 per pick and column at 128
    heads, against 8 with 16-head tiles.
    """
    block_dr = next_pow2(d_r)
    block_dv = next_pow2(d_v)
    if interpreting():
        h = next_pow2(min(H, 16))
        return (h, 16, block_dv, block_dr, min(16, block_dv), 4), (h, 16, min(16, block_dv), 4)
    block_h = min(64, next_pow2(H))
    block_c = min(64, block_dv)
    return (block_h, 16, block_dv, block_dr, block_c, 8), (block_h, 64, block_c, 8)


BWD_STAGES = 2


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (``DEFAULT_NUM_SMS`` off CUDA)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_NUM_SMS


def auto_num_splits(programs: int, K: int, block_k: int, sms: int) -> int:
    """Split-KV count for ``programs`` (tokens x head blocks) over ``K`` picks: enough splits to give
    every SM a program, at most one per ``MIN_SPLIT_BLOCKS`` blocks of picks; 1 (no split) once the
    tokens alone fill the machine (prefill, large-batch decode)."""
    if programs >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, programs), triton.cdiv(K, block_k * MIN_SPLIT_BLOCKS)))


def _split_len(K: int, num_splits: int, block_k: int) -> tuple[int, int]:
    # picks per split, a multiple of BLOCK_K; the count can drop below the request (no empty split)
    split_len = triton.cdiv(triton.cdiv(max(K, 1), num_splits), block_k) * block_k
    return split_len, triton.cdiv(max(K, 1), split_len)


def sparse_mla_fwd(
    q: torch.Tensor,
    kv: torch.Tensor,
    idx: torch.Tensor,
    sm_scale: float,
    d_v: int,
    *,
    num_splits: int | None = None,
    fp8_kv: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on validated inputs -> ``(out [B,S,H,d_v] q.dtype, lse [B,S,H] fp32)``.

    ``num_splits``: split-KV count (``None``: :func:`auto_num_splits`). Each split writes an fp32
    partial ``(out, lse)`` over its share of the picks and :func:`_sparse_mla_combine_kernel` merges
    them. ``fp8_kv``: ``kv`` is the packed uint8 ``[B, T, row_bytes]`` cache of :mod:`.kv_fp8`.
    """
    B, S, H, D = q.shape
    d_r = D - d_v
    T, K = kv.shape[1], idx.shape[-1]
    q, kv = _unit_last(q), _unit_last(kv)
    out = torch.empty((B, S, H, d_v), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, S, H), dtype=torch.float32, device=q.device)
    if B * S * H == 0:
        return out, lse
    if fp8_kv:
        kv_lat, kv_sc, kv_rope = kv_fp8_views(kv, d_v)
    else:
        kv_lat, kv_sc, kv_rope = kv, kv, (kv[..., d_v:] if d_r else kv)
    block_h, block_k, block_dv, block_dr, parts, warps = _blocks(H, d_v, d_r, fp8_kv)
    n_hb = triton.cdiv(H, block_h)
    if num_splits is None:
        num_splits = auto_num_splits(B * S * n_hb * parts, K, block_k, num_sms(q.device))
    split_len, n_split = _split_len(K, num_splits, block_k)
    if n_split == 1:
        dst, dst_lse = out.unsqueeze(2), lse.unsqueeze(2)  # (B, S, 1, H, d_v): the split axis is unit
    else:
        dst = torch.empty((B, S, n_split, H, d_v), dtype=torch.float32, device=q.device)
        dst_lse = torch.empty((B, S, n_split, H), dtype=torch.float32, device=q.device)
    _sparse_mla_fwd_kernel[(B * S * n_split * parts * n_hb,)](
        q, kv_lat, kv_sc, kv_rope, idx, dst, dst_lse,
        S, T, H, K, d_v, d_r, sm_scale * LOG2E, n_hb, n_split, split_len,
        *q.stride()[:3], *kv_lat.stride()[:2], *kv_sc.stride()[:2], *kv_rope.stride()[:2], *idx.stride(),
        *dst.stride()[:4], *dst_lse.stride(),
        HAS_ROPE=d_r > 0, FP8=fp8_kv, **dot_flags(q.dtype),
        ALIGNED=_aligned16(q, kv_lat, kv_rope, dst), EVEN_DV=d_v == block_dv * parts, EVEN_DR=d_r == block_dr,
        DV_PARTS=parts, BLOCK_H=block_h, BLOCK_K=block_k, BLOCK_DV=block_dv, BLOCK_DR=block_dr,
        num_warps=warps, num_stages=FWD_STAGES,
    )  # fmt: skip
    if n_split > 1:
        _combine(dst, dst_lse, out, lse)
    return out, lse


def _combine_blocks(H: int, d_v: int, n_split: int) -> tuple[int, int, int]:
    # (BLOCK_H, BLOCK_C, BLOCK_DV): a (16, 512) fp32 accumulator is 64 registers over 4 warps
    return next_pow2(min(H, 16)), next_pow2(n_split, minimum=2), next_pow2(d_v)


def _combine(part: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    B, S, n_split, H, d_v = part.shape
    block_h, block_c, block_dv = _combine_blocks(H, d_v, n_split)
    n_hb = triton.cdiv(H, block_h)
    part, part_lse = part.view(B * S, n_split, H, d_v), part_lse.view(B * S, n_split, H)
    out2, lse2 = out.view(B * S, H, d_v), lse.view(B * S, H)
    _sparse_mla_combine_kernel[(B * S * n_hb,)](
        part, part_lse, out2, lse2, H, d_v, n_split, n_hb,
        *part.stride(), *part_lse.stride(), *out2.stride(), *lse2.stride(),
        BLOCK_H=block_h, BLOCK_C=block_c, BLOCK_DV=block_dv, num_warps=4,
    )  # fmt: skip


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
    *,
    deterministic: bool = False,
    budget_bytes: int = DET_BUDGET_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward -> ``(dq, dkv)`` in q's / kv's dtype.

    ``deterministic=False`` scatters dkv with fp32 atomics (last bits depend on the order).
    ``deterministic=True`` gives bitwise-reproducible dkv: query tokens are processed in chunks whose
    fp32 partial ``[rows, H / BLOCK_H, K, D]`` fits ``budget_bytes``; the dkv kernel stores each
    (token, head block, pick)'s contribution there (plain stores, each slot has one writer), and an
    ordered reduction adds them per key row in query order, head blocks in order. dq needs nothing
    extra (each program owns its rows). Memory is bounded by ``budget_bytes``; the price is traffic:
    the partial is written and read once, ``8 * B*S * (H / 64) * K * D`` bytes (about 77 GB per V3.2
    layer for 4096 tokens x k = 2048, i.e. ~25 ms on an H100, more than the atomic backward's scatter),
    plus a stable sort of each chunk's picks and two launches per chunk: a mode for reproducibility
    runs, not for throughput.
    """
    B, S, H, D = q.shape
    d_r = D - d_v
    T, K = kv.shape[1], idx.shape[-1]
    q, kv, dout = _unit_last(q), _unit_last(kv), _unit_last(dout)
    # delta = rowsum(dO * O) - dlse: the softmax-backward correction, (B, S, H) fp32
    delta = (dout.float() * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - torch.where(torch.isfinite(lse), dlse.float(), torch.zeros_like(delta))
    delta = delta.contiguous()
    dq = torch.empty((B, S, H, D), dtype=torch.float32, device=q.device)
    dkv = torch.zeros((B, T, D), dtype=torch.float32, device=q.device)
    if B * S * H == 0:
        return dq.to(q.dtype), dkv.to(kv.dtype)
    (block_h, block_k, block_dv, block_dr, block_c, warps), (kh, kk, kc, kwarps) = _bwd_blocks(H, d_v, d_r)
    n_hb, n_kb = triton.cdiv(H, block_h), triton.cdiv(K, kk)
    rows = B * S
    flags = dot_flags(q.dtype)
    aligned = _aligned16(q, kv, dout) and D % 4 == 0
    strides = (*q.stride()[:3], *kv.stride()[:2], *idx.stride(), *dout.stride()[:3], *lse.stride())
    _sparse_mla_bwd_dq_kernel[(rows * n_hb,)](
        q, kv, idx, dout, lse, delta, dq,
        S, T, H, K, d_v, d_r, sm_scale, sm_scale * LOG2E, n_hb, *strides,
        HAS_ROPE=d_r > 0, **flags, ALIGNED=aligned, EVEN_DV=d_v % block_c == 0 and d_v == block_dv,
        EVEN_DR=d_r == block_dr, BLOCK_H=block_h, BLOCK_K=block_k, BLOCK_DV=block_dv, BLOCK_DR=block_dr,
        BLOCK_C=block_c, num_warps=warps, num_stages=BWD_STAGES,
    )  # fmt: skip

    def launch(row0: int, n_rows: int, part: torch.Tensor) -> None:
        _sparse_mla_bwd_dkv_kernel[(n_rows * n_kb,)](
            q, kv, idx, dout, lse, delta, dkv, part,
            S, T, H, K, d_v, d_r, sm_scale, sm_scale * LOG2E, n_kb, row0, *strides,
            part.stride(0), part.stride(1), part.stride(2),
            DETERMINISTIC=deterministic, HAS_ROPE=d_r > 0, **flags, ALIGNED=aligned, EVEN_DV=d_v % kc == 0,
            EVEN_DR=d_r == block_dr, BLOCK_H=kh, BLOCK_K=kk, BLOCK_DR=block_dr, BLOCK_C=kc,
            num_warps=kwarps, num_stages=BWD_STAGES,
        )  # fmt: skip

    if not deterministic:
        launch(0, rows, dkv.view(B * T, 1, D))
        return dq.to(q.dtype), dkv.to(kv.dtype)
    n_hb = triton.cdiv(H, kh)
    chunk = max(1, min(rows, budget_bytes // max(1, n_hb * K * D * 4)))
    part = torch.empty((chunk, n_hb, K, D), dtype=torch.float32, device=q.device)
    flat_idx = idx.reshape(rows, K).long()
    for row0 in range(0, rows, chunk):
        n = min(chunk, rows - row0)
        launch(row0, n, part)
        _ordered_reduce(part, flat_idx[row0 : row0 + n], row0, S, T, dkv.view(B * T, D))
    return dq.to(q.dtype), dkv.to(kv.dtype)


def _ordered_reduce(
    part: torch.Tensor, ids: torch.Tensor, row0: int, S: int, T: int, dkv: torch.Tensor
) -> None:
    # keys b * T + id of the chunk's valid picks, in (row, pick) order; a stable sort groups them by
    # key and keeps query order inside each group
    n, K = ids.shape
    valid = (ids >= 0) & (ids < T)
    b = ((row0 + torch.arange(n, device=ids.device)) // S).unsqueeze(-1)
    flat = torch.nonzero(valid.reshape(-1)).squeeze(-1)
    if flat.numel() == 0:
        return
    keys = (b * T + ids).reshape(-1)[flat]
    keys, perm = torch.sort(keys, stable=True)
    order = flat[perm].contiguous()
    uniq, counts = torch.unique_consecutive(keys, return_counts=True)
    starts = torch.zeros(uniq.numel() + 1, dtype=torch.int64, device=ids.device)
    starts[1:] = torch.cumsum(counts, 0)
    D = dkv.shape[-1]
    _dkv_ordered_reduce_kernel[(uniq.numel(),)](
        part, order, uniq.contiguous(), starts, dkv, K, D, part.shape[1],
        part.stride(0), part.stride(1), part.stride(2), BLOCK_D=min(256, next_pow2(D)), num_warps=4,
    )  # fmt: skip


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
        num_splits: int | None = None,
        deterministic: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = sparse_mla_fwd(q, kv, idx, sm_scale, d_v, num_splits=num_splits)
        ctx.save_for_backward(q, kv, idx, out, lse)
        ctx.sm_scale = sm_scale
        ctx.d_v = d_v
        ctx.deterministic = deterministic
        return out, lse

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, dout: torch.Tensor | None, dlse: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        q, kv, idx, out, lse = ctx.saved_tensors  # type: ignore[attr-defined]
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dkv = sparse_mla_bwd(
            q, kv, idx, out, lse, dout, dlse, ctx.sm_scale, ctx.d_v,  # type: ignore[attr-defined]
            deterministic=ctx.deterministic,  # type: ignore[attr-defined]
        )  # fmt: skip
        return dq, dkv, None, None, None, None, None


def default_sm_scale(d_qk: int) -> float:
    """``1 / sqrt(d_qk)``, for callers that do not fold YaRN's mscale in."""
    return 1.0 / math.sqrt(d_qk)
