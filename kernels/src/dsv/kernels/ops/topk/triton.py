"""Triton radix select: the top-``k`` key indices of each score row (rows up to 128K long).

One program per row. Scores are mapped to order-preserving uint32 keys (flip all bits of negatives,
set the sign bit of positives; -0.0 becomes +0.0 first, as torch holds them equal), then four 8-bit
radix passes each build a 256-bin histogram of the next digit among the keys that match the prefix
found so far and pick the digit where the running count from the top crosses ``k``: after four
passes the prefix is exactly the k-th largest key. A last pass writes every index whose key is above
it plus the first ``k - count_above`` equal ones, compacted with a prefix sum (so in ascending
index order). Among equal scores the lower index wins: the rule of
``dsv.core.attention.select_topk_reference`` and the CPU kernel, so every backend selects the same
keys. Five streaming reads of the row, no sort, no [rows, T] temporaries. Picks whose score is
``-inf`` (masked keys) are written as ``-1``.

``method="auto"`` uses this kernel except for short rows on CUDA (T <= 4096), where core's reference
is used: one well-tuned ``torch.topk`` launch (of ``k + 1``, then a pass over only the rows tied at
the boundary); the crossover is a default to re-measure with ``dsv bench kernels``.

Run the checks: ``TRITON_INTERPRET=1 pytest kernels/tests/test_kernels_topk.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv.core.attention import select_topk_reference
from dsv.kernels._checks import interpreting
from dsv.kernels._tl import device_fn

TORCH_TOPK_MAX_T = 4096


@device_fn
def _sortable(x):
    bits = x.to(tl.uint32, bitcast=True)
    bits = tl.where(bits == 0x80000000, tl.zeros_like(bits), bits)  # -0.0 ties with +0.0
    neg = (bits >> 31) == 1
    return tl.where(neg, ~bits, bits | 0x80000000)


@triton.jit
def _radix_topk_kernel(x_ptr, out_ptr, T, K, stride_xr, stride_or, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xr
    o_row = out_ptr + row * stride_or
    bins = tl.arange(0, 256)
    prefix = tl.zeros([], dtype=tl.uint32)
    prefix_mask = tl.zeros([], dtype=tl.uint32)
    k_rem = K
    for p in tl.static_range(4):
        shift = 24 - 8 * p  # p is a static_range constant, so this folds at compile time
        hist = tl.zeros([256], dtype=tl.int32)
        for start in range(0, T, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            m = offs < T
            key = _sortable(tl.load(x_row + offs, mask=m, other=float("-inf")))
            match = m & ((key & prefix_mask) == prefix)
            digit = ((key >> shift) & 0xFF).to(tl.int32)
            hist += tl.histogram(digit, 256, mask=match)
        # ge[d] = how many matching keys have a digit >= d; the wanted digit is the largest d with ge >= k_rem
        ge = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
        d = tl.max(tl.where(ge >= k_rem, bins, -1), axis=0)
        k_rem = k_rem - tl.sum(tl.where(bins > d, hist, 0), axis=0)
        prefix = prefix | (d.to(tl.uint32) << shift)
        prefix_mask = prefix_mask | tl.full([], 0xFF << shift, tl.uint32)
    # prefix is now the k-th largest key; k_rem of the keys equal to it are still to be taken
    n_written = 0
    n_equal = 0
    for start in range(0, T, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        m = offs < T
        x = tl.load(x_row + offs, mask=m, other=float("-inf"))
        key = _sortable(x)
        above = m & (key > prefix)
        equal = m & (key == prefix)
        take_equal = equal & (n_equal + tl.cumsum(equal.to(tl.int32), axis=0) <= k_rem)
        sel = above | take_equal
        pos = n_written + tl.cumsum(sel.to(tl.int32), axis=0) - 1
        val = tl.where(x == float("-inf"), -1, offs)
        tl.store(o_row + pos, val, mask=sel)
        n_written += tl.sum(sel.to(tl.int32), axis=0)
        n_equal += tl.sum(equal.to(tl.int32), axis=0)


def launch_radix_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Radix select over validated fp32 ``scores [B, S, T]``; returns int32 ``[B, S, min(k, T)]``."""
    B, S, T = scores.shape
    K = min(k, T)
    rows = scores.reshape(B * S, T)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((B * S, K), dtype=torch.int32, device=scores.device)
    if B * S == 0 or K == 0:
        return out.view(B, S, K)
    block = 64 if interpreting() else 2048
    _radix_topk_kernel[(B * S,)](rows, out, T, K, rows.stride(0), out.stride(0), BLOCK=block, num_warps=8)
    return out.view(B, S, K)


def torch_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``torch.topk`` path with the same output contract and tie rule (core's reference)."""
    return select_topk_reference(scores, k)
