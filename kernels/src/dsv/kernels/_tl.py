"""Small Triton helpers shared by the kernels.

``mma`` is ``tl.dot`` with one twist: Triton's CPU interpreter multiplies bf16/fp16 tiles wrongly
(fp32 and fp8 are right), so under ``TRITON_INTERPRET=1`` the launchers pass ``UPCAST=True`` and the
operands are widened to fp32 first. On a GPU the native low-precision MMA runs unchanged.

``device_fn`` marks the kernels' helper functions. Compiled, it is ``triton.jit``; under the
interpreter the helper stays a plain Python function, because the interpreter re-patches
``triton.language`` on every call of a jitted device function (milliseconds each, thousands of calls
per launch: it dominated the CPU test time) while a plain function runs inside the kernel's own patch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from dsv.kernels._checks import interpreting


def device_fn(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``triton.jit`` for a device (helper) function; the plain function under the interpreter."""
    return fn if interpreting() else triton.jit(fn)


@device_fn
def mma(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


def dot_flags(dtype: torch.dtype) -> dict[str, object]:
    """Constexpr kwargs for :func:`mma`: exact fp32 products for fp32 inputs (no TF32 drift against the
    references), native MMA otherwise, fp32 upcast in the interpreter."""
    return {"PREC": "ieee" if dtype == torch.float32 else "tf32", "UPCAST": interpreting()}
