"""FP8 block-quantised weights in the layout DeepSeek ships (V3, V3.1, V3.2-Exp, V3.2).

The facts, from deepseek-ai/DeepSeek-V3 ``README_WEIGHTS.md`` / ``inference/fp8_cast_bf16.py`` /
``inference/kernel.py`` and deepseek-ai/DeepSeek-V3.2-Exp ``inference/model.py``:

- ``config.json`` carries ``"quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
  "quant_method": "fp8", "weight_block_size": [128, 128]}``; V3.1 and later add ``"scale_fmt":
  "ue8m0"`` (every scale a power of two). ``torch_dtype`` stays ``"bfloat16"``: the tensors that are
  not quantised are bf16.
- A quantised weight ``W [M, N]`` is stored as ``float8_e4m3fn`` under its own name, beside
  ``<name>_scale_inv`` (float32, shape ``[ceil(M/128), ceil(N/128)]``, possibly in another shard).
  ``W ~= W_fp8 * scale_inv`` block by block; an edge block narrower than 128 is zero-padded for its
  scale and the padding dropped afterwards.
- Quantised: every ``Linear`` of the reference model — MLA's ``q_a_proj``, ``q_b_proj``,
  ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj``; the dense, routed and shared experts'
  ``gate_proj``/``up_proj``/``down_proj``; the V3.2 indexer's ``wq_b`` and ``wk``. Not quantised:
  embeddings, ``lm_head``, every norm (incl. the indexer's ``k_norm``), the router ``mlp.gate``
  and its ``e_score_correction_bias``, the indexer's ``weights_proj`` (bf16 in the reference,
  "weight_proj is not quantized" in SGLang/vLLM), and the MTP module's ``eh_proj`` and
  ``shared_head`` (plain ``nn.Linear`` in vLLM's ``deepseek_mtp``).

Quantisation here follows the same rule: ``scale_inv = amax(|block|) / 448`` (rounded up to a
power of two with ``scale_fmt="ue8m0"``), ``W_fp8 = W / scale_inv`` rounded to e4m3. Everything
runs on the CPU (``torch.float8_e4m3fn`` casts work there); :func:`dequantize_fp8` is the slow,
obviously correct twin any fast path is tested against.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from dsv.core.errors import CheckpointError

__all__ = [
    "BLOCK",
    "FP8_MAX",
    "SCALE_SUFFIX",
    "Fp8Config",
    "dequantize_fp8",
    "is_quantized_name",
    "quantize_fp8",
    "scale_shape",
]

FP8_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK = (128, 128)
SCALE_SUFFIX = "_scale_inv"  # "x.weight" -> "x.weight_scale_inv"

# The Linear weights the reference model keeps in FP8 (see the module docstring).
_QUANTIZED = re.compile(
    r"^model\.layers\.\d+\.("
    r"self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|q_proj|indexer\.wq_b|indexer\.wk)"
    r"|mlp\.((experts\.\d+|shared_experts)\.)?(gate_proj|up_proj|down_proj)"
    r")\.weight$"
)

_SUPPORTED_SCALE_FMTS = (None, "ue8m0")


def is_quantized_name(name: str) -> bool:
    """Whether the official FP8 layout stores the tensor ``name`` in FP8 with a ``_scale_inv``."""
    return _QUANTIZED.match(name) is not None


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] = BLOCK) -> tuple[int, int]:
    """``[ceil(M/b0), ceil(N/b1)]``: one scale per block, partial edge blocks included."""
    m, n = shape
    return (-(-m // block[0]), -(-n // block[1]))


@dataclass(frozen=True, kw_only=True)
class Fp8Config:
    """``quantization_config`` of an FP8 checkpoint (the fields DeepSeek's ``config.json`` uses)."""

    weight_block_size: tuple[int, int] = BLOCK
    scale_fmt: str | None = None  # "ue8m0" (V3.1 and later): scales are powers of two
    activation_scheme: str = "dynamic"

    @classmethod
    def from_hf(cls, raw: Any, source: str) -> Fp8Config:
        """Validate a ``quantization_config`` dict; one :class:`CheckpointError` line otherwise."""
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: quantization_config must be a JSON object, got {raw!r}")
        method = raw.get("quant_method")
        if method != "fp8":
            raise CheckpointError(
                f"{source}: quantization_config.quant_method {method!r} is not supported; dsv reads "
                "fp8 block-quantised checkpoints (DeepSeek's layout) only: dequantise it with its own "
                "tooling first"
            )
        fmt = raw.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise CheckpointError(f"{source}: quantization_config.fmt {fmt!r} is not supported (only e4m3)")
        block = raw.get("weight_block_size")
        if (
            not isinstance(block, (list, tuple))
            or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
        ):
            raise CheckpointError(
                f"{source}: quantization_config.weight_block_size must be two positive integers "
                f"such as [128, 128], got {block!r}"
            )
        scale_fmt = raw.get("scale_fmt")
        if scale_fmt not in _SUPPORTED_SCALE_FMTS:
            raise CheckpointError(
                f"{source}: quantization_config.scale_fmt {scale_fmt!r} is not supported "
                "(fp32 scales, optionally rounded to powers of two: 'ue8m0')"
            )
        scheme = raw.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise CheckpointError(
                f"{source}: quantization_config.activation_scheme {scheme!r} is not supported (only dynamic)"
            )
        return cls(weight_block_size=(block[0], block[1]), scale_fmt=scale_fmt, activation_scheme=scheme)

    def to_hf(self) -> dict[str, Any]:
        """The ``quantization_config`` dict, keys as in DeepSeek's ``config.json``."""
        out: dict[str, Any] = {
            "activation_scheme": self.activation_scheme,
            "fmt": "e4m3",
            "quant_method": "fp8",
        }
        if self.scale_fmt is not None:
            out["scale_fmt"] = self.scale_fmt
        out["weight_block_size"] = list(self.weight_block_size)
        return out


def _blocks(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Zero-pad ``x [M, N]`` to whole blocks and view it as ``(M/b0, N/b1, b0, b1)``."""
    m, n = x.shape
    sm, sn = scale_shape((m, n), block)
    padded = torch.nn.functional.pad(x, (0, sn * block[1] - n, 0, sm * block[0] - m))
    return padded.view(sm, block[0], sn, block[1]).transpose(1, 2)


def quantize_fp8(
    weight: torch.Tensor, block: tuple[int, int] = BLOCK, *, scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight_fp8 [M, N] float8_e4m3fn, scale_inv [ceil(M/b0), ceil(N/b1)] float32)``."""
    if weight.dim() != 2:
        raise ValueError(f"FP8 block quantisation takes a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    blocks = _blocks(w, block)  # (sm, sn, b0, b1)
    amax = blocks.abs().amax(dim=(-1, -2))
    # An all-zero block gets any positive scale (its values stay 0); tiny() keeps 0/0 away.
    scale = amax.clamp(min=torch.finfo(torch.float32).tiny) / FP8_MAX
    if scale_fmt == "ue8m0":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    elif scale_fmt is not None:
        raise ValueError(f"unknown scale_fmt {scale_fmt!r}; use None or 'ue8m0'")
    q = (blocks / scale[:, :, None, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    m, n = w.shape
    q = q.transpose(1, 2).reshape(scale.shape[0] * block[0], scale.shape[1] * block[1])[:m, :n]
    return q.contiguous(), scale.contiguous()


def dequantize_fp8(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = BLOCK,
    *,
    dtype: torch.dtype = torch.bfloat16,
    name: str = "weight",
) -> torch.Tensor:
    """``weight_fp8 * scale_inv`` block by block (in fp32, then ``dtype``); a scale tensor of the
    wrong shape is a :class:`CheckpointError` naming ``name``."""
    if weight.dim() != 2:
        raise CheckpointError(f"{name}: an FP8 weight must be 2-D, got shape {tuple(weight.shape)}")
    want = scale_shape(tuple(weight.shape), block)
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(
            f"{name}{SCALE_SUFFIX} has shape {tuple(scale_inv.shape)}, but a {tuple(weight.shape)} weight "
            f"in {block[0]}x{block[1]} blocks needs {want}; the checkpoint's weight_block_size does not "
            "match its scales (or the file is damaged)"
        )
    m, n = weight.shape
    s = scale_inv.float().repeat_interleave(block[0], 0)[:m].repeat_interleave(block[1], 1)[:, :n]
    return (weight.float() * s).to(dtype)
