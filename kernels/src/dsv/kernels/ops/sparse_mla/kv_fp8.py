"""The deployed FP8 latent cache layout (FlashMLA's): per token, ``d_v`` e4m3 latent values, one fp32
scale per 128 of them, then the ``d_r`` rope values in bf16 (not quantised, for accuracy).

For V3.2 (``d_v = 512``, ``d_r = 64``) a row is ``512 + 4 * 4 + 64 * 2 = 656`` bytes. The scale of each
128-block is ``max(amax, 1e-4) / 448`` (e4m3's largest finite value), as the reference model's
``act_quant``; a value is ``fp8 * scale``. The packed cache is a ``uint8 [..., row_bytes]`` tensor;
the kernels read it through three dtype views of the same storage (:func:`kv_fp8_views`).
"""

from __future__ import annotations

import torch

FP8_BLOCK = 128  # latent values per fp32 scale
FP8_MAX = 448.0  # largest finite float8_e4m3fn
AMAX_FLOOR = 1e-4

__all__ = ["dequantize_mla_kv_fp8", "kv_fp8_row_bytes", "kv_fp8_views", "quantize_mla_kv_fp8"]


def kv_fp8_row_bytes(d_v: int, d_r: int) -> int:
    """Bytes per token of the packed cache: latent e4m3, fp32 scales, bf16 rope."""
    return d_v + 4 * (d_v // FP8_BLOCK) + 2 * d_r


def quantize_mla_kv_fp8(kv: torch.Tensor, d_v: int) -> torch.Tensor:
    """Pack ``kv [..., d_v + d_r]`` (float) into the FP8 cache layout ``uint8 [..., row_bytes]``.

    ``d_v`` must be a multiple of 128 and ``d_r`` even (the fp32 / bf16 parts stay aligned)."""
    lead, D = kv.shape[:-1], kv.shape[-1]
    d_r = D - d_v
    g = d_v // FP8_BLOCK
    latent = kv[..., :d_v].float().reshape(*lead, g, FP8_BLOCK)  # (..., G, 128)
    scale = latent.abs().amax(-1).clamp_min(AMAX_FLOOR) / FP8_MAX  # (..., G)
    q8 = (latent / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    out = torch.zeros((*lead, kv_fp8_row_bytes(d_v, d_r)), dtype=torch.uint8, device=kv.device)
    out[..., :d_v] = q8.reshape(*lead, d_v).view(torch.uint8)
    out[..., d_v : d_v + 4 * g] = scale.contiguous().view(torch.uint8)
    out[..., d_v + 4 * g :] = kv[..., d_v:].to(torch.bfloat16).contiguous().view(torch.uint8)
    return out


def kv_fp8_views(packed: torch.Tensor, d_v: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(latent e4m3 [..., d_v], scales fp32 [..., d_v/128], rope bf16 [..., d_r])``: views that share
    ``packed``'s storage (its rows must be contiguous)."""
    g = d_v // FP8_BLOCK
    latent = packed[..., :d_v].view(torch.float8_e4m3fn)
    scales = packed.view(torch.float32)[..., d_v // 4 : d_v // 4 + g]
    rope = packed.view(torch.bfloat16)[..., (d_v + 4 * g) // 2 :]
    return latent, scales, rope


def dequantize_mla_kv_fp8(packed: torch.Tensor, d_v: int) -> torch.Tensor:
    """Inverse of :func:`quantize_mla_kv_fp8`: ``uint8 [..., row_bytes]`` -> fp32 ``[..., d_v + d_r]``."""
    latent, scales, rope = kv_fp8_views(packed.contiguous(), d_v)
    lead = latent.shape[:-1]
    values = latent.float().reshape(*lead, -1, FP8_BLOCK) * scales.unsqueeze(-1)
    return torch.cat([values.reshape(*lead, d_v), rope.float()], dim=-1)
