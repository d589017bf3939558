"""Torch references for the lightning indexer: bf16/fp32 scores (core's reference) and the FP8 path.

The FP8 path follows the reference model (spec §2.2): q and k are quantised to e4m3 with one fp32
scale per row (per (token, head) for q, per token for k; amax floored at 1e-4, max 448, optionally
rounded up to a power of two = ``ue8m0``). Because the scales are positive they commute with ReLU, so
the FP8 scores equal the bf16 formula applied to the dequantised tensors; that is the reference.
"""

from __future__ import annotations

import torch

from dsv.core.attention import indexer_scores_reference

FP8_MAX = 448.0
AMAX_FLOOR = 1e-4

__all__ = [
    "dequantize_fp8_rows",
    "indexer_scores_fp8_reference",
    "indexer_scores_reference",
    "quantize_fp8_rows",
]


def quantize_fp8_rows(x: torch.Tensor, *, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x [..., D]`` to float8 e4m3 with one fp32 scale per row: ``x ~= x_fp8 * scale[..., None]``.

    ``ue8m0=True`` rounds each scale up to a power of two, as the deployed model does.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("x: expected a floating-point tensor [..., D]")
    amax = x.detach().abs().amax(dim=-1).float().clamp_min(AMAX_FLOOR)
    scale = amax / FP8_MAX
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    x_fp8 = (x.float() / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return x_fp8, scale


def dequantize_fp8_rows(x_fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8_rows` (fp32)."""
    return x_fp8.float() * scale.float().unsqueeze(-1)


def indexer_scores_fp8_reference(
    q_fp8: torch.Tensor,
    q_scale: torch.Tensor,
    k_fp8: torch.Tensor,
    k_scale: torch.Tensor,
    w: torch.Tensor,
    q_offset: torch.Tensor | int = 0,
) -> torch.Tensor:
    """``I[b,t,s] = k_scale[b,s] * sum_h w[b,t,h] * q_scale[b,t,h] * relu(q8[b,t,h] . k8[b,s])``, fp32."""
    return indexer_scores_reference(
        dequantize_fp8_rows(q_fp8, q_scale), dequantize_fp8_rows(k_fp8, k_scale), w.float(), q_offset
    )
