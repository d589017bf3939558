"""Compile every dsv.kernels kernel for a CUDA architecture without a GPU, at the real V3.2 shapes.

Triton lowers a kernel to PTX and ptxas (shipped in the triton wheel) assembles it to a cubin on any
machine; no driver is needed. That checks, before any GPU is at hand, that each kernel compiles with
the launch configuration its launcher picks for V3.2 (128 MLA heads, 512 + 64 latent, 64 index heads
x 128, k = 2048), and reports what the hardware limits care about: shared memory per program (228 KiB
on H100/H200), registers per thread (255 max) and spill stores (bytes per thread that did not fit in
registers and go through local memory), as ``ptxas -v`` reports them. It does not run anything: speed and
numerical results on the GPU remain unmeasured (see tools/bench/results/kernels.md).

Block sizes come from the launchers' own ``_blocks`` helpers, so what is compiled is what would launch.
Integer arguments are compiled as i32 (Triton passes values below 2^31 that way; the kernels widen
every product that can exceed it to int64 themselves).

Run (without ``TRITON_INTERPRET``): ``python -m dsv.kernels.cuda_compile [--arch 90] [--only NAME]``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CompileResult", "compile_all", "compile_kernel"]


@dataclass(frozen=True, kw_only=True)
class CompileResult:
    """What one kernel compiled to."""

    name: str
    config: str
    shared_bytes: int
    registers: int | None
    spill_bytes: int | None
    seconds: float


def compile_kernel(
    kernel: Any,
    *,
    pointers: dict[str, str],
    constexprs: dict[str, Any],
    floats: tuple[str, ...] = (),
    num_warps: int = 4,
    num_stages: int = 3,
    arch: int = 90,
    name: str | None = None,
) -> CompileResult:
    """Compile ``kernel`` (a ``@triton.jit`` function) for ``sm_<arch>``; ``pointers`` maps pointer
    arguments to Triton types (``"*bf16"``), ``constexprs`` gives every constexpr, ``floats`` names the
    fp32 scalars; remaining arguments are i32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for arg in kernel.arg_names:
        if arg in pointers:
            signature[arg] = pointers[arg]
        elif arg in constexprs:
            signature[arg] = "constexpr"
        else:
            signature[arg] = "fp32" if arg in floats else "i32"
    t0 = time.perf_counter()
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    seconds = time.perf_counter() - t0
    regs, spill = _resource_usage(compiled.asm["ptx"], arch)
    shown = {k: v for k, v in constexprs.items() if k.startswith("BLOCK") or k in ("SPARSE", "FP8", "UE8M0")}
    return CompileResult(
        name=name or kernel.__name__,
        config=", ".join(f"{k}={v}" for k, v in shown.items()) + f", warps={num_warps}, stages={num_stages}",
        shared_bytes=int(compiled.metadata.shared),
        registers=regs,
        spill_bytes=spill,
        seconds=seconds,
    )


def _resource_usage(ptx: str, arch: int) -> tuple[int | None, int | None]:
    """(registers per thread, spill-store bytes) from ``ptxas -v`` on the kernel's PTX, with the ptxas
    Triton itself uses for ``arch``; ``(None, None)`` when that tool is missing."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        tool = get_ptxas(arch).path
    except Exception:  # pragma: no cover - a triton build without the NVIDIA tools
        return None, None
    suffix = "a" if arch >= 90 else ""  # sm_90a: the wgmma/TMA instructions Triton emits for Hopper
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run(
            [tool, f"-arch=sm_{arch}{suffix}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
        )
    log = done.stdout + done.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    return (int(regs.group(1)) if regs else None), (int(spill.group(1)) if spill else None)


def _specs() -> list[tuple[str, Any, dict[str, Any]]]:
    """(label, kernel, compile kwargs) for every kernel at the V3.2 shapes, blocks as the launchers pick."""
    from dsv.kernels._checks import next_pow2
    from dsv.kernels.ops.indexer import triton as ix
    from dsv.kernels.ops.indexer_kl import triton as kl
    from dsv.kernels.ops.sparse_mla import triton as sm
    from dsv.kernels.ops.topk import triton as tk

    H, D_V, D_R = 128, 512, 64  # MLA heads, latent, rope (k = 2048 is a runtime loop bound)
    HI, DI = 64, 128  # index heads x dim
    S = 4096  # a prefill chunk (> 1 query: the prefill branch of the launchers)
    bf16 = "*bf16"
    specs: list[tuple[str, Any, dict[str, Any]]] = []
    for fp8 in (False, True):
        bt, bs, bh, bd = ix._blocks(S, HI, DI)
        qt = "*fp8e4nv" if fp8 else bf16
        specs.append((
            f"indexer fwd ({'fp8' if fp8 else 'bf16'})", ix._indexer_kernel,
            dict(pointers={"q_ptr": qt, "k_ptr": qt, "w_ptr": "*fp32", "qs_ptr": "*fp32", "ks_ptr": "*fp32",
                           "off_ptr": "*i64", "out_ptr": "*fp32"},
                 constexprs=dict(FP8=fp8, PREC="tf32", UPCAST=False, BLOCK_T=bt, BLOCK_S=bs, BLOCK_H=bh, BLOCK_D=bd)),
        ))  # fmt: skip
    bt_dq, bt_dk, bs, bh, bd, warps = ix._bwd_blocks(HI, DI)
    ptrs = {"q_ptr": bf16, "k_ptr": bf16, "w_ptr": "*fp32", "g_ptr": "*fp32", "off_ptr": "*i64",
            "dq_ptr": "*fp32", "dw_ptr": "*fp32", "dk_ptr": "*fp32"}  # fmt: skip
    for label, kern, bt in (("indexer bwd dq/dw", ix._indexer_bwd_dq_kernel, bt_dq),
                            ("indexer bwd dk", ix._indexer_bwd_dk_kernel, bt_dk)):  # fmt: skip
        meta = dict(PREC="tf32", UPCAST=False, BLOCK_T=bt, BLOCK_S=bs, BLOCK_H=bh, BLOCK_D=bd)
        specs.append((label, kern, dict(pointers=ptrs, constexprs=meta, num_warps=warps)))
    specs.append((
        "topk radix", tk._radix_topk_kernel,
        dict(pointers={"x_ptr": "*fp32", "out_ptr": "*i32"}, constexprs=dict(BLOCK=2048), num_warps=8),
    ))  # fmt: skip
    bh, bk, bdv, bdr = sm._blocks(H, D_V, D_R)
    warps = 8 if bdv >= 256 else 4
    smeta = dict(HAS_ROPE=True, PREC="tf32", UPCAST=False, BLOCK_H=bh, BLOCK_K=bk, BLOCK_DV=bdv, BLOCK_DR=bdr)
    specs.append((
        "sparse_mla fwd", sm._sparse_mla_fwd_kernel,
        dict(pointers={"q_ptr": bf16, "kv_ptr": bf16, "idx_ptr": "*i32", "out_ptr": bf16, "lse_ptr": "*fp32"},
             constexprs=smeta, floats=("scale_log2",), num_warps=warps),
    ))  # fmt: skip
    specs.append((
        "sparse_mla bwd", sm._sparse_mla_bwd_kernel,
        dict(pointers={"q_ptr": bf16, "kv_ptr": bf16, "idx_ptr": "*i32", "do_ptr": bf16, "lse_ptr": "*fp32",
                       "delta_ptr": "*fp32", "dq_ptr": "*fp32", "dkv_ptr": "*fp32"},
             constexprs=smeta, floats=("sm_scale", "scale_log2"), num_warps=warps),
    ))  # fmt: skip
    bh, bn, bd = kl._blocks(H, D_V + D_R)
    kptrs = {"q_ptr": bf16, "kv_ptr": bf16, "idx_ptr": "*i32", "off_ptr": "*i64", "lse_ptr": "*fp32",
             "p_ptr": "*fp32"}  # fmt: skip
    for sparse in (False, True):
        kmeta = dict(SPARSE=sparse, BLOCK_H=bh, BLOCK_N=bn, BLOCK_D=bd, PREC="tf32", UPCAST=False)
        mode = "sparse" if sparse else "dense"
        for label, kern in (("lse", kl._attn_lse_kernel), ("probs", kl._probs_kernel)):
            specs.append((
                f"indexer_kl {label} ({mode})", kern,
                dict(pointers=kptrs, constexprs=kmeta, floats=("scale_log2",), num_warps=kl._NUM_WARPS),
            ))  # fmt: skip
    specs.append((
        "indexer_kl kl_row", kl._kl_row_kernel,
        dict(pointers={"p_ptr": "*fp32", "x_ptr": "*fp32", "kl_ptr": "*fp32", "grad_ptr": "*fp32"},
             constexprs=dict(WRITE_GRAD=True, BLOCK_N=kl.KL_BLOCK_N), floats=("inv_rows", "eps")),
    ))  # fmt: skip
    from dsv.kernels.ops.fp8_gemm import triton as fg

    specs.append((
        "fp8 act_quant (ue8m0)", fg._act_quant_kernel,
        dict(pointers={"x_ptr": bf16, "y_ptr": "*fp8e4nv", "s_ptr": "*fp32"},
             constexprs=dict(UE8M0=True, BLOCK=fg.QUANT_BLOCK)),
    ))  # fmt: skip
    for rows in (1, 4096):  # a decode step, a prefill chunk
        bm, bn, gm, warps, stages = fg._blocks(rows)
        specs.append((
            f"fp8 gemm (M={rows})", fg._fp8_gemm_kernel,
            dict(pointers={"a_ptr": "*fp8e4nv", "w_ptr": "*fp8e4nv", "c_ptr": bf16, "as_ptr": "*fp32",
                           "ws_ptr": "*fp32"},
                 constexprs=dict(PREC="tf32", UPCAST=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=fg.QUANT_BLOCK,
                                 GROUP_M=gm),
                 num_warps=warps, num_stages=stages),
        ))  # fmt: skip
    assert next_pow2(D_V) == D_V
    return specs


def compile_all(*, arch: int = 90, only: str | None = None) -> list[CompileResult]:
    """Compile every kernel (or those whose label contains ``only``) at the V3.2 shapes."""
    return [
        compile_kernel(kern, arch=arch, name=label, **kw)
        for label, kern, kw in _specs()
        if only is None or only in label
    ]


def main(argv: list[str] | None = None) -> int:
    """Print a Markdown table of the compile results."""
    from dsv.kernels._checks import interpreting

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100/H200)")
    parser.add_argument("--only", default=None, help="compile only kernels whose label contains this")
    args = parser.parse_args(argv)
    if interpreting():
        print("error: unset TRITON_INTERPRET (the interpreter replaces the compiler)", file=sys.stderr)
        return 1
    labels = [label for label, _, _ in _specs()]
    if args.only is not None and not any(args.only in label for label in labels):
        print(f"error: no kernel label contains {args.only!r}; labels: {', '.join(labels)}", file=sys.stderr)
        return 2
    print(
        f"| kernel (sm_{args.arch}, V3.2 shapes) | config | shared KiB | regs/thread | spill B | compile s |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for r in compile_all(arch=args.arch, only=args.only):
        print(
            f"| {r.name} | {r.config} | {r.shared_bytes / 1024:.1f} | {r.registers} | {r.spill_bytes} | "
            f"{r.seconds:.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
