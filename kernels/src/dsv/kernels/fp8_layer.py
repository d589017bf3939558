"""A Linear layer that keeps its weight in FP8 (e4m3, one fp32 scale per 128x128 block).

For a released (FP8) checkpoint: ``model, _ = load_pretrained(ckpt, dtype=torch.bfloat16)`` then
:func:`load_fp8_linears` (model, ckpt) swaps every projection the checkpoint stores in FP8 for an
:class:`Fp8Linear` holding the stored e4m3 tensor and scale, bit for bit.

On CUDA its forward is :func:`dsv.kernels.fp8_linear`: the activations are quantised per token per 128
channels and multiplied by the e4m3 weight in the block-scaled Triton GEMM, so the weight is never
widened (half the bytes of bf16, the layout of the released checkpoints). Elsewhere it dequantises the
weight (in fp32, then the activations' dtype) and calls ``F.linear``: the CPU keeps the bf16/fp32 path,
which is exact with respect to the stored FP8 values.

``weight`` reads back the dequantised matrix, so model code that uses a projection's weight outside
its forward (MLA's absorbed ``kv_b_proj``, the MoE's stacked expert bank) keeps working unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dsv.core.fp8 import BLOCK, dequantize_fp8, is_quantized_name, quantize_fp8, scale_shape

__all__ = ["BACKENDS", "Fp8Linear", "load_fp8_linears", "quantize_linears"]

BACKENDS = ("auto", "triton", "torch")


class Fp8Linear(nn.Module):
    """``y = x @ dequant(qweight, weight_scale_inv).T + bias`` with the weight stored in e4m3.

    ``backend``: ``"auto"`` (the Triton GEMM for CUDA tensors, the dequantised matmul otherwise),
    ``"triton"`` (always the kernel; on CPU that needs ``TRITON_INTERPRET=1``) or ``"torch"``.
    ``ue8m0`` rounds the activation scales up to powers of two, as V3.1/V3.2 (``scale_fmt: ue8m0``) do.
    Inference only: the weight takes no gradient.
    """

    def __init__(
        self,
        qweight: torch.Tensor,
        weight_scale_inv: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        ue8m0: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if qweight.dim() != 2 or qweight.dtype != torch.float8_e4m3fn:
            raise TypeError(f"qweight: expected a float8_e4m3fn [N, K] tensor, got {qweight.dtype} "
                            f"{tuple(qweight.shape)}")  # fmt: skip
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
        if tuple(weight_scale_inv.shape) != scale_shape(tuple(qweight.shape), BLOCK):
            raise ValueError(f"weight_scale_inv: a {tuple(qweight.shape)} weight in 128x128 blocks needs scales "
                             f"{scale_shape(tuple(qweight.shape), BLOCK)}, got {tuple(weight_scale_inv.shape)}")  # fmt: skip
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale_inv", weight_scale_inv.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.ue8m0 = ue8m0
        self.backend = backend
        self.dtype = torch.bfloat16 if bias is None else bias.dtype

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, scale_fmt: str | None = None, backend: str = "auto"
    ) -> Fp8Linear:
        """Quantise ``linear``'s weight with :func:`dsv.core.fp8.quantize_fp8` (the checkpoint layout)."""
        q, s = quantize_fp8(linear.weight, BLOCK, scale_fmt=scale_fmt)
        module = cls(q, s, linear.bias, ue8m0=scale_fmt == "ue8m0", backend=backend)
        module.dtype = linear.weight.dtype
        return module

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised weight ``[N, K]`` in the layer's compute dtype (a new tensor each read)."""
        return dequantize_fp8(self.qweight, self.weight_scale_inv, BLOCK, dtype=self.dtype)

    def _use_kernel(self, x: torch.Tensor) -> bool:
        return self.backend == "triton" or (self.backend == "auto" and x.is_cuda)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_kernel(x):
            from dsv.kernels._api import fp8_linear

            return fp8_linear(x, self.qweight, self.weight_scale_inv, self.bias, ue8m0=self.ue8m0)
        w = dequantize_fp8(self.qweight, self.weight_scale_inv, BLOCK, dtype=x.dtype)
        return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, e4m3 128x128 blocks, "
                f"bias={self.bias is not None}, backend={self.backend}")  # fmt: skip


def quantize_linears(model: nn.Module, *, scale_fmt: str | None = None, backend: str = "auto") -> list[str]:
    """Replace, in place, every ``nn.Linear`` that the released checkpoints store in FP8
    (:func:`dsv.core.fp8.is_quantized_name`: MLA, expert and indexer projections; never embeddings,
    heads, routers or the indexer's ``weights_proj``) by an :class:`Fp8Linear`; returns their names."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and is_quantized_name(f"{name}.weight")
    ]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(
            parent, child, Fp8Linear.from_linear(getattr(parent, child), scale_fmt=scale_fmt, backend=backend)
        )
    return names


def load_fp8_linears(model: nn.Module, path: str | Path, *, backend: str = "auto") -> list[str]:
    """Replace, in place, every ``nn.Linear`` whose weight the checkpoint at ``path`` stores in FP8 by
    an :class:`Fp8Linear` holding the stored e4m3 weight and ``weight_scale_inv`` exactly (on the
    Linear's device, its dtype kept for ``Fp8Linear.weight``); returns their names. Activation scales
    follow the checkpoint's ``scale_fmt`` (``ue8m0`` rounds them to powers of two)."""
    from safetensors import safe_open

    from dsv.core.checkpoint import _raw_config, fp8_pairs, resolve, tensor_index
    from dsv.core.errors import CheckpointError
    from dsv.core.fp8 import Fp8Config

    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    folder = resolve(path)
    index = tensor_index(folder)
    pairs, block = fp8_pairs(index, folder)
    if not pairs:
        raise CheckpointError(f"{folder}: the checkpoint stores no FP8 weights")
    if tuple(block) != BLOCK:
        raise CheckpointError(
            f"{folder}: weight_block_size {list(block)}; the FP8 GEMM takes [128, 128] blocks"
        )
    qc = Fp8Config.from_hf(_raw_config(folder)["quantization_config"], f"{folder}/config.json")
    names = []
    for weight_name, scale_name in sorted(pairs.items()):
        module_name = weight_name.removesuffix(".weight")
        try:
            linear = model.get_submodule(module_name)
        except AttributeError:
            raise CheckpointError(
                f"{folder}: {weight_name} has no Linear in the model; load the model from this checkpoint"
            ) from None
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(f"{folder}: {module_name} is a {type(linear).__name__}, not an nn.Linear")
        tensors = {}
        for name in (weight_name, scale_name):
            with safe_open(str(index[name].file), framework="pt") as sf:
                tensors[name] = sf.get_tensor(name).to(linear.weight.device)
        layer = Fp8Linear(tensors[weight_name], tensors[scale_name], linear.bias, ue8m0=qc.scale_fmt == "ue8m0",
                          backend=backend)  # fmt: skip
        layer.dtype = linear.weight.dtype
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        names.append(module_name)
    return names
