"""Torch references for the FP8 linear layer of the released checkpoints (spec: DeepSeek's
``inference/kernel.py`` ``act_quant`` + ``fp8_gemm``).

Weights are e4m3 with one fp32 ``scale_inv`` per 128x128 block (dsv.core.fp8, the checkpoint layout).
Activations are quantised on the fly: one fp32 scale per token per 128 input channels, ``amax / 448``
(amax floored at 1e-4), optionally rounded up to a power of two (``ue8m0``, V3.1/V3.2's ``scale_fmt``).
A last group narrower than 128 channels takes its scale from the channels it has, as a partial edge
block of the weight does. The GEMM's reference is "dequantise both, then matmul" in fp32.
"""

from __future__ import annotations

import torch

from dsv.core.fp8 import BLOCK, FP8_MAX, dequantize_fp8

AMAX_FLOOR = 1e-4

__all__ = ["act_quant_reference", "dequantize_act", "fp8_gemm_reference"]


def act_quant_reference(
    x: torch.Tensor, *, block: int = BLOCK[1], ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., K]`` -> ``(x_fp8 [..., K] e4m3, scale [..., ceil(K/block)] fp32)`` with
    ``x ~= x_fp8 * scale`` per group of ``block`` channels."""
    K = x.shape[-1]
    groups = -(-K // block)
    xf = torch.nn.functional.pad(x.float(), (0, groups * block - K)).unflatten(-1, (groups, block))
    scale = xf.abs().amax(dim=-1).clamp_min(AMAX_FLOOR) / FP8_MAX
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (xf / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2)[..., :K].contiguous(), scale.contiguous()


def dequantize_act(x_fp8: torch.Tensor, scale: torch.Tensor, *, block: int = BLOCK[1]) -> torch.Tensor:
    """Inverse of :func:`act_quant_reference`, in fp32."""
    K = x_fp8.shape[-1]
    return x_fp8.float() * scale.float().repeat_interleave(block, dim=-1)[..., :K]


def fp8_gemm_reference(
    a_fp8: torch.Tensor,
    a_scale: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``dequant(a) @ dequant(w).T`` in fp32, cast to ``out_dtype``: ``a [..., K]``, ``w [N, K]`` -> ``[..., N]``."""
    w = dequantize_fp8(w_fp8, w_scale, BLOCK, dtype=torch.float32)
    return (dequantize_act(a_fp8, a_scale) @ w.T).to(out_dtype)
