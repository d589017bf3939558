"""Small Triton helpers shared by the kernels.

``mma`` is ``tl.dot`` with one twist: Triton's CPU interpreter multiplies bf16/fp16 tiles wrongly
(fp32 and fp8 are right), so under ``TRITON_INTERPRET=1`` the launchers pass ``UPCAST=True`` and the
operands are widened to fp32 first. On a GPU the native low-precision MMA runs unchanged.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv.kernels._checks import interpreting


@triton.jit
def mma(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


def dot_flags(dtype: torch.dtype) -> dict[str, object]:
    """Constexpr kwargs for :func:`mma`: exact fp32 products for fp32 inputs (no TF32 drift against the
    references), native MMA otherwise, fp32 upcast in the interpreter."""
    return {"PREC": "ieee" if dtype == torch.float32 else "tf32", "UPCAST": interpreting()}
