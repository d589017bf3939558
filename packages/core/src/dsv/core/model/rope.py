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

import functools
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


class Rotary:
    """One forward's rotations: ``cos/sin [B, S, d/2]`` (fp32) and, built on first use and kept for
    every later layer, the forms each layout multiplies by. A small model's decode step applies
    RoPE four times per layer, and rebuilding those forms each time (the complex rotation, the
    signed half-split tables, their head axis) was a quarter of the step's torch ops."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.cos, self.sin = cos, sin
        self._forms: dict[tuple[object, ...], torch.Tensor] = {}

    @classmethod
    def at(cls, config: ModelConfig, positions: torch.Tensor, inv_freq: torch.Tensor) -> Rotary:
        """The rotations of absolute ``positions [B, S]``."""
        return cls(*rope_angles(config, positions, inv_freq))

    def head(self, n: int) -> Rotary:
        """The rotations of the first ``n`` positions of every row."""
        return Rotary(self.cos[:, :n], self.sin[:, :n])

    def interleaved(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate adjacent pairs ``(x0, x1), (x2, x3), ...`` of ``x [B, S, (H,) d]`` (MLA's layout);
        the output keeps the layout and ``x``'s dtype."""
        rot = self._form(("interleaved", x.dim()), x)
        xf = x if x.dtype == torch.float32 else x.float()
        if xf.stride(-1) != 1 or xf.storage_offset() % 2 or any(st % 2 for st in xf.stride()[:-1]):
            xf = xf.contiguous()
        # One complex product per pair (the reference's own formulation).
        out = torch.view_as_real(torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * rot).flatten(-2)
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def half(self, x: torch.Tensor, width: int | None = None) -> torch.Tensor:
        """Rotate half-split pairs ``(x_i, x_{i+w/2})`` of the first ``width`` dims of
        ``x [B, S, (H,) d]`` (the indexer's NeoX layout; ``width`` defaults to ``2 * cos.shape[-1]``);
        the dims past ``width`` pass through. Output in ``x``'s dtype.

        ``x * c + x[partner] * s`` with ``c = [cos, cos, 1...]`` and ``s = [-sin, sin, 0...]``: the
        same products and sums as rotating the two halves apart (``a + (-b)`` is ``a - b`` exactly),
        in four ops."""
        rot = self.cos.shape[-1]
        width = 2 * rot if width is None else width
        if width != 2 * rot:
            raise ValueError(f"half-split RoPE over {width} dims needs {width // 2} angles, got {rot}")
        d = x.shape[-1]
        c = self._form(("half-cos", x.dim(), d), x)
        s = self._form(("half-sin", x.dim(), d), x)
        xf = x if x.dtype == torch.float32 else x.float()
        out = xf * c + xf.index_select(-1, _partners(d, width, x.device)) * s
        return out if x.dtype == torch.float32 else out.to(x.dtype)

    def _form(self, key: tuple[object, ...], x: torch.Tensor) -> torch.Tensor:
        """The table ``key`` for inputs like ``x``: built once from its 3-D form (a head axis is a view)."""
        form = self._forms.get(key)
        if form is not None:
            return form
        if key[1] == 4:
            form = self._form((key[0], 3, *key[2:]), x).unsqueeze(2)
        else:
            cos, sin = self.cos, self.sin
            if cos.device != x.device:
                cos, sin = cos.to(x.device), sin.to(x.device)
            if key[0] == "interleaved":
                form = torch.complex(cos, sin)
            else:  # half-split: [cos, cos] or [-sin, sin], then 1 / 0 over the pass-through dims
                fill = 1.0 if key[0] == "half-cos" else 0.0
                pair = torch.cat((cos, cos) if fill else (-sin, sin), -1)
                extra = int(key[2]) - pair.shape[-1]  # type: ignore[call-overload]
                form = torch.nn.functional.pad(pair, (0, extra), value=fill) if extra else pair
        self._forms[key] = form
        return form


@functools.lru_cache(maxsize=32)
def _partners(d: int, width: int, device: torch.device) -> torch.Tensor:
    """For each of ``d`` dims, the dim it rotates with: ``i <-> i + width/2`` below ``width``, itself above."""
    # A plain tensor even when first asked for under inference mode: a training forward's
    # index_select keeps it for the backward pass.
    with torch.inference_mode(False):
        partner = torch.arange(d, device=device)
        half = width // 2
        partner[:width] = torch.cat((partner[half:width], partner[:half]))
    return partner
