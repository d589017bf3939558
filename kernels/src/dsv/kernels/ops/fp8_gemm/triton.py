"""Triton kernels for the FP8 linear layer: per-token activation quantisation and the block-scaled GEMM.

``act_quant``: one program per (token, 128-channel group) computes ``scale = max(amax, 1e-4) / 448``
(rounded up to a power of two for ``ue8m0``) and writes the e4m3 values and the fp32 scale, as
DeepSeek's ``inference/kernel.py`` does. Unlike it, a last group narrower than 128 channels is masked,
so any K works. Triton's CPU interpreter casts fp32 to e4m3 wrongly when rounding carries into the
next power of two (31.9 becomes 16, not 32), so under ``TRITON_INTERPRET=1`` the kernel writes the
scaled fp32 values and the launcher casts them with torch (round to nearest even, as the GPU's
``cvt.rn.satfinite`` does).

``fp8_gemm``: ``out = (a_fp8 * a_scale) @ (w_fp8 * w_scale).T`` without dequantising either operand.
The K loop steps one 128-channel group at a time, so each step's e4m3 x e4m3 MMA (native on Hopper)
is rescaled by that group's activation scales (one per row) and weight scales (one per 128 output
channels) before it joins the fp32 accumulator. Output tiles are visited in groups of ``GROUP_M`` rows
so that consecutive programs reuse the same weight columns from L2.

Run the checks: ``TRITON_INTERPRET=1 pytest kernels/tests/test_kernels_fp8_gemm.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv.kernels._checks import interpreting
from dsv.kernels._tl import dot_flags, mma

QUANT_BLOCK = 128  # channels per activation scale = the weight block's width (weight_block_size)


@triton.jit
def _act_quant_kernel(
    x_ptr, y_ptr, s_ptr,
    K, G,
    stride_xm, stride_ym, stride_sm,
    UE8M0: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    offs = g * BLOCK + tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-4) / 448.0
    if UE8M0:
        s = tl.exp2(tl.ceil(tl.log2(s)))
    y = tl.clamp(x / s, -448.0, 448.0)
    tl.store(y_ptr + row * stride_ym + offs, y.to(y_ptr.dtype.element_ty), mask=mask)  # e4m3, or fp32
    tl.store(s_ptr + row * stride_sm + g, s)


def launch_act_quant(x2d: torch.Tensor, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a validated ``[M, K]`` tensor (unit stride along K); returns e4m3 ``[M, K]``, fp32 ``[M, G]``."""
    M, K = x2d.shape
    G = triton.cdiv(K, QUANT_BLOCK)
    cast_outside = interpreting()
    y = torch.empty((M, K), dtype=torch.float32 if cast_outside else torch.float8_e4m3fn, device=x2d.device)
    s = torch.empty((M, G), dtype=torch.float32, device=x2d.device)
    if M == 0 or K == 0:
        return y.to(torch.float8_e4m3fn), s
    _act_quant_kernel[(M, G)](
        x2d, y, s, K, G, x2d.stride(0), y.stride(0), s.stride(0), UE8M0=ue8m0, BLOCK=QUANT_BLOCK
    )
    return (y.to(torch.float8_e4m3fn) if cast_outside else y), s


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, w_ptr, c_ptr, as_ptr, ws_ptr,
    M, N, K, G,
    stride_am, stride_wn, stride_cm, stride_asm, stride_wsn,
    PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * grid_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    # int64: row * stride reaches 2^31 for a 128K-token prefill at K = 18432
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    as_ptrs = as_ptr + offs_m.to(tl.int64) * stride_asm
    ws_ptrs = ws_ptr + (offs_n // BLOCK_K) * stride_wsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(G):
        k_mask = offs_k < K - g * BLOCK_K
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        a_s = tl.load(as_ptrs + g, mask=m_mask, other=0.0)
        w_s = tl.load(ws_ptrs + g, mask=n_mask, other=0.0)
        acc += mma(a, w, PREC, UPCAST) * a_s[:, None] * w_s[None, :]
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _blocks(M: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, GROUP_M, num_warps, num_stages) for ``M`` rows; BLOCK_K is the quant block.

    Picked from ``python -m dsv.kernels.cuda_compile`` (sm_90 ptxas, no GPU needed): the per-group
    rescaling keeps a second fp32 tile live beside the accumulator, and 128 x 128 tiles spilled 1.5 KB
    per thread, 64 x 128 still 380 B; 16 x 128 (decode) and 64 x 64 spill nothing. Speed on a GPU is
    what the benchmark measures (``dsv bench fp8-gemm``)."""
    if interpreting():
        return 16, 32, 2, 4, 1
    if M <= 16:
        return 16, 128, 8, 4, 4
    return 64, 64, 8, 4, 4


def launch_fp8_gemm(
    a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """``[M, K] x [N, K]^T -> [M, N]`` on validated, K-contiguous operands."""
    M, K = a.shape
    N = w.shape[0]
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    block_m, block_n, group_m, warps, stages = _blocks(M)
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _fp8_gemm_kernel[grid](
        a, w, c, a_scale, w_scale,
        M, N, K, triton.cdiv(K, QUANT_BLOCK),
        a.stride(0), w.stride(0), c.stride(0), a_scale.stride(0), w_scale.stride(0),
        **dot_flags(torch.float8_e4m3fn),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=QUANT_BLOCK, GROUP_M=group_m,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return c
