"""Argument checks shared by the public kernel entry points.

Every public op validates shapes, dtypes and devices here *before* anything is
launched, so a mistake surfaces as one ``ValueError``/``TypeError`` that names the
argument and the expected shape instead of a crash (or silent garbage) inside a
kernel. Internal to dsv.kernels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
FP8_DTYPES = (torch.float8_e4m3fn,)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_tensor(
    name: str,
    t: object,
    layout: str,
    *,
    ndim: int,
    dtypes: Sequence[torch.dtype],
    shape: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """Check that ``t`` is a tensor of rank ``ndim`` with one of ``dtypes`` and (where given) the sizes
    in ``shape`` (``None`` = any). ``layout`` is the human-readable expected shape, e.g. ``"[B, S, H, D]"``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected shape {layout} ({ndim} dims), got {tuple(t.shape)}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({allowed}), got {str(t.dtype).removeprefix('torch.')}")
    if shape is not None:
        for axis, (want, got) in enumerate(zip(shape, t.shape, strict=True)):
            if want is not None and want != got:
                raise ValueError(
                    f"{name}: expected shape {layout} = {_fmt(shape)}, got {tuple(t.shape)} (dim {axis} is {got}, "
                    f"expected {want})"
                )
    return t


def _fmt(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, and a device the kernels can run on (CUDA, or CPU under the interpreter)."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name}: expected device {first.device} (same as {first_name}), got {t.device}")
    if first.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{first_name}: the Triton kernels need CUDA tensors (got device {first.device}); "
            "set TRITON_INTERPRET=1 to run them on CPU, or use the torch references in dsv.core.attention"
        )
    return first.device


def check_same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{name}: expected dtype {first.dtype} (same as {first_name}), got {t.dtype}")
    return first.dtype


def offsets_tensor(q_offset: int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """``q_offset`` (int or ``[B]`` integer tensor) as a contiguous int64 ``[B]`` tensor on ``device``."""
    if isinstance(q_offset, bool) or not isinstance(q_offset, int | torch.Tensor):
        raise TypeError(
            f"q_offset: expected an int or an integer tensor of shape [B], got {type(q_offset).__name__}"
        )
    if isinstance(q_offset, int):
        if q_offset < 0:
            raise ValueError(f"q_offset: expected >= 0, got {q_offset}")
        return torch.full((batch,), q_offset, dtype=torch.int64, device=device)
    check_tensor("q_offset", q_offset, "[B]", ndim=1, dtypes=INDEX_DTYPES, shape=(batch,))
    if q_offset.device != device:
        raise ValueError(f"q_offset: expected device {device}, got {q_offset.device}")
    return q_offset.to(torch.int64).contiguous()


def next_pow2(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum); tl.dot needs block dims >= 16."""
    p = minimum
    while p < n:
        p *= 2
    return p
