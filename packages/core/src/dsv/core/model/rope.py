"""YaRN rotary embeddings, in the two layouts V3.2 uses.

MLA rotates *interleaved* pairs ``(x0, x1), (x2, x3), ...`` (the reference's complex view); the
lightning indexer rotates *half-split* pairs ``(x_i, x_{i+d/2})`` (NeoX style) on the first
``qk_rope_head_dim`` dims of its 128-dim q/k. The indexer originally shipped interleaved; DeepSeek
later called that a bug and fixed it (HF commit 1938e9df). dsv follows the fix, as transformers does.

transformers applies MLA's interleaved rotation but returns the result de-interleaved
(``[even..., odd...]``); dsv keeps the reference's interleaved output. Since q and k are permuted
alike, every attention score is identical; only the cached ``k_pe`` bytes are ordered differently.

Frequencies (spec §1.4): ``freq_i = theta^(-2i/d)``; with YaRN, dims whose wavelength exceeds the
original context are interpolated by ``1/factor`` with a linear ramp between ``beta_fast`` and
``beta_slow`` correction dims. cos/sin are not rescaled (the reference never rescales them;
transformers multiplies them by ``mscale/mscale_all_dim``, which is 1.0 for every released config).
"""

from __future__ import annotations

import math

import torch

from dsv.core.config import ModelConfig


def inv_frequencies(config: ModelConfig) -> torch.Tensor:
    """Per-pair inverse frequencies ``[qk_rope_head_dim // 2]`` (fp32), YaRN-corrected when active."""
    dim = config.qk_rope_head_dim
    base = config.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    yarn = config.yarn
    if yarn is None:
        return freqs
    factor = float(yarn["factor"])
    original = float(yarn["original_max_position_embeddings"])
    beta_fast = float(yarn.get("beta_fast") or 32)
    beta_slow = float(yarn.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    smooth = 1 - ramp
    return freqs / factor * (1 - smooth) + freqs * smooth


def rope_angles(
    config: ModelConfig, positions: torch.Tensor, inv_freq: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin ``[B, S, d/2]`` (fp32) for absolute ``positions [B, S]``."""
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq.to(positions.device)
    return angles.cos(), angles.sin()


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of ``x [B, S, (H,) d]``; ``cos/sin [B, S, d/2]``. Output keeps the layout."""
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    xf = x.float()
    if xf.stride(-1) != 1 or xf.storage_offset() % 2 or any(st % 2 for st in xf.stride()[:-1]):
        xf = xf.contiguous()
    # One complex product per pair (the reference's own formulation): three ops instead of ten.
    pairs = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))
    out = torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2)
    return out.to(x.dtype)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate half-split pairs ``(x_i, x_{i+d/2})`` of ``x [B, S, (H,) d]`` (NeoX layout)."""
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    xf = x.float()
    half = xf.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
