"""Triton top-k select: the top-``k`` key indices of each score row (rows up to 128K long), within a
per-row key range ``[start, end)``.

Scores are mapped to order-preserving uint32 keys (flip all bits of negatives, set the sign bit of
positives; -0.0 becomes +0.0 first, as torch holds them equal). One program per row:

1. one pass over the row's range builds a 4096-bin histogram of the top 12 bits of the keys (sign,
   exponent, three mantissa bits) and finds the threshold bin, where the count from the top crosses
   ``k``: every key in a higher bin is picked, ``k_rem`` keys of the threshold bin are still to choose;
2. a second pass writes the positions of the keys above the threshold bin and collects the
   positions of the threshold bin's keys, in ascending order, into a small candidate buffer
   (``CAP`` entries of scratch memory that stay in L2);
3. three radix passes over the candidates (8, 8 and 4 bits) find the exact k-th largest key, and
   one more writes the candidates above it plus the first ``k_rem`` equal ones;
4. the ``k`` picks are sorted into ascending position order in registers.

When the rows alone leave most SMs idle (decode at small batch, long rows), steps 1 and 2 of each
row run in up to 64 chunks on as many programs (three launches; see ``_topk_split_*``), with the
same output.

Among equal scores the lower position wins: the rule of ``dsv.core.attention.select_topk_reference``
and of the CPU kernel, so every backend selects the same keys. A threshold bin with more than
``CAP`` keys (heavy exact ties) makes step 3 stream the row instead of the buffer, with the same
result. Rows whose range holds at most ``k`` keys skip all of it (every key is picked). For ``k``
above :data:`SORT_MAX` the sort of step 4 is replaced by a last pass over the row that writes the
picks in position order. Picks whose score is ``-inf`` are written as ``-1``, in place; slots past
the range's length are ``-1`` at the end.

``method="auto"`` uses this kernel except for short rows on CUDA (T <= 4096) without ranges, where
core's reference is used: one well-tuned ``torch.topk`` launch (of ``k + 1``, then a pass over only
the rows tied at the boundary); the crossover is a default to re-measure with ``dsv bench kernels``.

Run the checks: ``TRITON_INTERPRET=1 pytest kernels/tests/test_kernels_topk.py
kernels/tests/test_kernels_topk_v2.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv.core.attention import select_topk_reference
from dsv.kernels._checks import interpreting, next_pow2
from dsv.kernels._tl import device_fn

TORCH_TOPK_MAX_T = 4096
SORT_MAX = 4096  # largest k whose picks are sorted in registers (V3.2: k = 2048)


@device_fn
def _sortable(x):
    bits = x.to(tl.uint32, bitcast=True)
    bits = tl.where(bits == 0x80000000, tl.zeros_like(bits), bits)  # -0.0 ties with +0.0
    neg = (bits >> 31) == 1
    return tl.where(neg, ~bits, bits | 0x80000000)


@device_fn
def _source(x_row, c_row, use_buf, lo, n_src, c0, BLOCK: tl.constexpr):
    # BLOCK positions and keys from the candidate buffer (use_buf) or straight from the row's range
    idx = c0 + tl.arange(0, BLOCK)
    m = idx < n_src
    n_buf = tl.where(use_buf, n_src, 0)  # (an int bound: the interpreter mis-types bool & bool masks)
    pos = tl.where(use_buf, tl.load(c_row + idx, mask=idx < n_buf, other=0), lo + idx)
    key = _sortable(tl.load(x_row + pos, mask=m, other=float("-inf")))
    return pos, key, m


@device_fn
def _refine(x_row, c_row, use_buf, lo, n_src, prefix, pmask, k_rem,
            SHIFT: tl.constexpr, DMASK: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    # one radix digit ((key >> SHIFT) & DMASK) among the keys that match the prefix found so far
    bins = tl.arange(0, 256)
    hist = tl.zeros([256], dtype=tl.int32)
    for c0 in range(0, n_src, BLOCK):
        pos, key, m = _source(x_row, c_row, use_buf, lo, n_src, c0, BLOCK)
        match = m & ((key & pmask) == prefix)
        hist += tl.histogram(((key >> SHIFT) & DMASK).to(tl.int32), 256, mask=match)
    # ge[d] = matching keys with a digit >= d; the wanted digit is the largest d with ge >= k_rem
    ge = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
    d = tl.max(tl.where(ge >= k_rem, bins, -1), axis=0)
    k_rem = k_rem - tl.sum(tl.where(bins > d, hist, 0), axis=0)
    prefix = prefix | (d.to(tl.uint32) << SHIFT)
    pmask = pmask | tl.full([], DMASK << SHIFT, tl.uint32)
    return prefix, pmask, k_rem


@device_fn
def _range(st_ptr, en_ptr, row, T, stride_rr, HAS_RANGES: tl.constexpr):
    # the row's key range [lo, hi), clipped to [0, T), and its length
    if HAS_RANGES:
        lo = tl.maximum(tl.load(st_ptr + row * stride_rr), 0)
        hi = tl.minimum(tl.load(en_ptr + row * stride_rr), T)
    else:
        lo = 0
        hi = T
    return lo, hi, tl.maximum(hi - lo, 0)


@device_fn
def _write_all(x_row, o_row, lo, n, K, BLOCK: tl.constexpr):
    # a range of at most K keys: every key is picked, in order, then -1 past the range
    for s0 in range(0, K, BLOCK):
        offs = s0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + lo + offs, mask=offs < n, other=float("-inf"))
        tl.store(o_row + offs, tl.where(x == float("-inf"), -1, lo + offs), mask=offs < K)


@device_fn
def _histogram(x_row, s_lo, s_hi, BLOCK: tl.constexpr):
    # pass 1: the 4096-bin histogram of the top 12 bits of the keys in [s_lo, s_hi)
    hist = tl.zeros([4096], dtype=tl.int32)
    for s0 in range(s_lo, s_hi, BLOCK):
        offs = s0 + tl.arange(0, BLOCK)
        m = offs < s_hi
        key = _sortable(tl.load(x_row + offs, mask=m, other=float("-inf")))
        hist += tl.histogram((key >> 20).to(tl.int32), 4096, mask=m)
    return hist


@device_fn
def _threshold(hist, K):
    # the threshold bin d (where the count from the top crosses K), the picks still wanted from it,
    # how many keys lie above it and how many in it
    bins = tl.arange(0, 4096)
    ge = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # keys with a bin >= each bin
    d = tl.max(tl.where(ge >= K, bins, -1), axis=0)
    n_above = tl.sum(tl.where(bins > d, hist, 0), axis=0)
    return d, K - n_above, n_above, tl.sum(tl.where(bins == d, hist, 0), axis=0)


@device_fn
def _collect(x_row, o_row, c_row, s_lo, s_hi, d, n_out, n_cand, CAP, SORT: tl.constexpr, BLOCK: tl.constexpr):
    # pass 2 over [s_lo, s_hi): (SORT) the positions above bin d go to the output from slot n_out on,
    # the bin's positions to the candidate buffer from slot n_cand on, both in ascending order
    n_out = tl.zeros([], tl.int32) + n_out  # (a literal 0 would arrive as a constexpr)
    n_cand = tl.zeros([], tl.int32) + n_cand
    for s0 in range(s_lo, s_hi, BLOCK):
        offs = s0 + tl.arange(0, BLOCK)
        m = offs < s_hi
        top = (_sortable(tl.load(x_row + offs, mask=m, other=float("-inf"))) >> 20).to(tl.int32)
        if SORT:
            above = m & (top > d)
            tl.store(o_row + n_out + tl.cumsum(above.to(tl.int32), axis=0) - 1, offs, mask=above)
            n_out += tl.sum(above.to(tl.int32), axis=0)
        inbin = m & (top == d)
        slot = n_cand + tl.cumsum(inbin.to(tl.int32), axis=0) - 1
        tl.store(c_row + slot, offs, mask=inbin & (slot < CAP))
        n_cand += tl.sum(inbin.to(tl.int32), axis=0)


@device_fn
def _finish(x_row, o_row, c_row, lo, n, d, k_rem, n_out, n_cand, CAP, K,
            SORT: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    # the candidates in the buffer, or (more than CAP of them) the whole range once more
    n_out = tl.zeros([], tl.int32) + n_out  # (a literal 0 would arrive as a constexpr)
    use_buf = n_cand <= CAP
    n_src = tl.where(use_buf, n_cand, n)
    prefix = d.to(tl.uint32) << 20
    pmask = tl.full([], 0xFFF00000, tl.uint32)
    # the 20 bits below the bin's: digits of 8, 8 and 4 bits
    prefix, pmask, k_rem = _refine(x_row, c_row, use_buf, lo, n_src, prefix, pmask, k_rem, 12, 0xFF, BLOCK)
    prefix, pmask, k_rem = _refine(x_row, c_row, use_buf, lo, n_src, prefix, pmask, k_rem, 4, 0xFF, BLOCK)
    prefix, pmask, k_rem = _refine(x_row, c_row, use_buf, lo, n_src, prefix, pmask, k_rem, 0, 0xF, BLOCK)
    # prefix is now the k-th largest key; k_rem of the keys equal to it are taken, lowest positions
    # first (the buffer holds them in ascending order)
    if not SORT:  # the last pass writes every pick in position order, straight from the row
        use_buf = False
        n_src = n
    n_equal = 0
    for c0 in range(0, n_src, BLOCK):
        pos, key, m = _source(x_row, c_row, use_buf, lo, n_src, c0, BLOCK)
        key_top = (key >> 20).to(tl.int32)
        equal = m & (key == prefix)
        take = (key > prefix) & (key_top == d)
        if not SORT:
            take = take | (key_top > d)
        take = m & (take | (equal & (n_equal + tl.cumsum(equal.to(tl.int32), axis=0) <= k_rem)))
        val = pos
        if not SORT:
            x = tl.load(x_row + pos, mask=take, other=0.0)
            val = tl.where(x == float("-inf"), -1, pos)
        tl.store(o_row + n_out + tl.cumsum(take.to(tl.int32), axis=0) - 1, val, mask=take)
        n_out += tl.sum(take.to(tl.int32), axis=0)
        n_equal += tl.sum(equal.to(tl.int32), axis=0)
    if SORT:  # two ascending runs (above the bin, then the bin's picks): one sort of the k picks
        offs_k = tl.arange(0, K_PAD)
        picks = tl.sort(tl.load(o_row + offs_k, mask=offs_k < K, other=2147483647))
        x = tl.load(x_row + picks, mask=offs_k < K, other=0.0)
        tl.store(o_row + offs_k, tl.where(x == float("-inf"), -1, picks), mask=offs_k < K)


@triton.jit
def _topk_kernel(
    x_ptr, st_ptr, en_ptr, cand_ptr, out_ptr,
    T, K, CAP,
    stride_xr, stride_rr, stride_cr, stride_or,
    HAS_RANGES: tl.constexpr, SORT: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # one program per row: all four steps
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xr
    o_row = out_ptr + row * stride_or
    c_row = cand_ptr + row * stride_cr
    lo, hi, n = _range(st_ptr, en_ptr, row, T, stride_rr, HAS_RANGES)
    if n <= K:
        _write_all(x_row, o_row, lo, n, K, BLOCK)
    else:
        d, k_rem, n_above, n_bin = _threshold(_histogram(x_row, lo, hi, BLOCK), K)
        _collect(x_row, o_row, c_row, lo, hi, d, 0, 0, CAP, SORT, BLOCK)
        n_out = n_above  # the keys above the bin are in the output already
        if not SORT:
            n_out = 0
        _finish(x_row, o_row, c_row, lo, n, d, k_rem, n_out, n_bin, CAP, K, SORT, K_PAD, BLOCK)


# Small batches (decode): each row is split into chunks over several programs for steps 1 and 2.
# Step 1 adds each chunk's histogram into the row's total (integer atomics: the same sums in any
# order) and keeps the chunk's own "keys in a bin >= b" counts, so that in step 2 every chunk knows,
# from two numbers per earlier chunk, where its positions go in the output and the candidate
# buffer; the output stays in ascending order. Steps 3 and 4 run as before, one program per row.


@triton.jit
def _topk_split_hist_kernel(
    x_ptr, st_ptr, en_ptr, tot_ptr, ge_ptr,
    T, K, CHUNK,
    stride_xr, stride_rr, stride_tr, stride_gr, stride_gc,
    HAS_RANGES: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    lo, hi, n = _range(st_ptr, en_ptr, row, T, stride_rr, HAS_RANGES)
    if n > K:
        c_lo = lo + chunk * CHUNK
        hist = _histogram(x_ptr + row * stride_xr, c_lo, tl.minimum(c_lo + CHUNK, hi), BLOCK)
        bins = tl.arange(0, 4096)
        tl.atomic_add(tot_ptr + row * stride_tr + bins, hist)
        ge = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
        tl.store(ge_ptr + row * stride_gr + chunk * stride_gc + bins, ge)


@triton.jit
def _topk_split_collect_kernel(
    x_ptr, st_ptr, en_ptr, tot_ptr, ge_ptr, cand_ptr, out_ptr,
    T, K, CAP, CHUNK,
    stride_xr, stride_rr, stride_tr, stride_gr, stride_gc, stride_cr, stride_or,
    HAS_RANGES: tl.constexpr, CHUNKS_PAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    lo, hi, n = _range(st_ptr, en_ptr, row, T, stride_rr, HAS_RANGES)
    if n > K:
        d, k_rem, n_above, n_bin = _threshold(tl.load(tot_ptr + row * stride_tr + tl.arange(0, 4096)), K)
        # the earlier chunks' keys above bin d and in it: where this chunk's positions start
        earlier = tl.arange(0, CHUNKS_PAD)
        ge_rows = ge_ptr + row * stride_gr + earlier * stride_gc
        at_d = tl.load(ge_rows + d, mask=earlier < chunk, other=0)
        above_d = tl.load(ge_rows + tl.minimum(d + 1, 4095), mask=earlier < chunk, other=0)
        above_d = tl.where(d < 4095, above_d, 0)  # nothing lies above the top bin
        c_lo = lo + chunk * CHUNK
        _collect(
            x_ptr + row * stride_xr, out_ptr + row * stride_or, cand_ptr + row * stride_cr,
            c_lo, tl.minimum(c_lo + CHUNK, hi), d, tl.sum(above_d, axis=0), tl.sum(at_d - above_d, axis=0),
            CAP, True, BLOCK,
        )  # fmt: skip


@triton.jit
def _topk_split_finish_kernel(
    x_ptr, st_ptr, en_ptr, tot_ptr, cand_ptr, out_ptr,
    T, K, CAP,
    stride_xr, stride_rr, stride_tr, stride_cr, stride_or,
    HAS_RANGES: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xr
    o_row = out_ptr + row * stride_or
    lo, hi, n = _range(st_ptr, en_ptr, row, T, stride_rr, HAS_RANGES)
    if n <= K:
        _write_all(x_row, o_row, lo, n, K, BLOCK)
    else:
        d, k_rem, n_above, n_bin = _threshold(tl.load(tot_ptr + row * stride_tr + tl.arange(0, 4096)), K)
        _finish(
            x_row,
            o_row,
            cand_ptr + row * stride_cr,
            lo,
            n,
            d,
            k_rem,
            n_above,
            n_bin,
            CAP,
            K,
            True,
            K_PAD,
            BLOCK,
        )


def _cand_cap() -> int:
    # positions a row keeps of its threshold bin; the interpreter's is small, so the tests overflow it
    return 32 if interpreting() else 4096


def _row_chunks(rows: int, T: int) -> int:
    """Programs per row for the histogram and collection passes: 1 unless the rows alone leave most
    SMs idle (decode at small batch) and are long; then up to 64 chunks of at least 8K keys."""
    if interpreting() or T < 16384:
        return 1
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    if rows * 4 > sms:
        return 1
    return max(1, min(64, sms // rows, T // 8192))


def launch_topk(
    scores: torch.Tensor, k: int, *, starts: torch.Tensor | None = None, ends: torch.Tensor | None = None
) -> torch.Tensor:
    """Top-k over validated fp32 ``scores [B, S, T]`` within ``[starts, ends)`` (int ``[B, S]``, either
    may be ``None``: ``0`` and ``T``); returns int32 ``[B, S, min(k, T)]``."""
    B, S, T = scores.shape
    K = min(k, T)
    R = B * S
    rows = scores.reshape(R, T)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((R, K), dtype=torch.int32, device=scores.device)
    if R == 0 or K == 0:
        return out.view(B, S, K)
    has_ranges = starts is not None or ends is not None
    if has_ranges:
        lo = torch.zeros(R, dtype=torch.int32, device=scores.device) if starts is None else starts
        hi = torch.full((R,), T, dtype=torch.int32, device=scores.device) if ends is None else ends
        lo = lo.reshape(R).to(torch.int32).contiguous()
        hi = hi.reshape(R).to(torch.int32).contiguous()
    else:
        lo = hi = out  # unused
    cap = _cand_cap()
    cand = torch.empty((R, cap), dtype=torch.int32, device=scores.device)
    sort = K <= SORT_MAX
    block = 64 if interpreting() else 2048
    k_pad = next_pow2(K) if sort else 16
    chunks = _row_chunks(R, T) if sort else 1
    if chunks == 1:
        _topk_kernel[(R,)](
            rows, lo, hi, cand, out, T, K, cap, rows.stride(0), lo.stride(0), cand.stride(0), out.stride(0),
            HAS_RANGES=has_ranges, SORT=sort, K_PAD=k_pad, BLOCK=block, num_warps=8,
        )  # fmt: skip
        return out.view(B, S, K)
    chunk = triton.cdiv(triton.cdiv(T, chunks), block) * block
    chunks = triton.cdiv(T, chunk)
    total = torch.zeros((R, 4096), dtype=torch.int32, device=scores.device)
    ge = torch.empty((R, chunks, 4096), dtype=torch.int32, device=scores.device)
    rs = lo.stride(0)
    _topk_split_hist_kernel[(R, chunks)](
        rows, lo, hi, total, ge, T, K, chunk, rows.stride(0), rs, total.stride(0), ge.stride(0), ge.stride(1),
        HAS_RANGES=has_ranges, BLOCK=block, num_warps=8,
    )  # fmt: skip
    _topk_split_collect_kernel[(R, chunks)](
        rows, lo, hi, total, ge, cand, out, T, K, cap, chunk,
        rows.stride(0), rs, total.stride(0), ge.stride(0), ge.stride(1), cand.stride(0), out.stride(0),
        HAS_RANGES=has_ranges, CHUNKS_PAD=next_pow2(chunks), BLOCK=block, num_warps=8,
    )  # fmt: skip
    _topk_split_finish_kernel[(R,)](
        rows, lo, hi, total, cand, out, T, K, cap, rows.stride(0), rs, total.stride(0), cand.stride(0),
        out.stride(0), HAS_RANGES=has_ranges, K_PAD=k_pad, BLOCK=block, num_warps=8,
    )  # fmt: skip
    return out.view(B, S, K)


def torch_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``torch.topk`` path with the same output contract and tie rule (core's reference)."""
    return select_topk_reference(scores, k)
