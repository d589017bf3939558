"""Compile every dsv.kernels kernel for a CUDA architecture without a GPU, at the real V3.2 shapes.

Triton lowers a kernel to PTX and ptxas (shipped in the triton wheel) assembles it to a cubin on any
machine; no driver is needed. That checks, before any GPU is at hand, that each kernel compiles with
the launch configuration its launcher picks for V3.2 (128 MLA heads, 512 + 64 latent, 64 index heads
x 128, k = 2048), and reports what the hardware limits care about: shared memory per program (227 KiB
per block on H100/H200), registers per thread (255 max) and spill stores (bytes per thread that did not
fit in registers and go through local memory), as ``ptxas -v`` reports them when run with the flags
Triton itself passes (``--regAllocOptLevel=2`` moves both numbers; the register count is checked against
the cubin Triton built). It also says which tensor-core instructions each kernel got: ``wgmma`` (Hopper's
warpgroup MMA, ``wgmma.mma_async`` in the PTX, ``HGMMA``/``QGMMA`` in the SASS, which needs tiles of 64
rows per warpgroup) or the Ampere-style ``mma.sync`` (``HMMA``), which Hopper runs at a fraction of its
peak. It does not run anything: speed and numerical results on the GPU remain unmeasured (see
tools/bench/results/kernels.md).

Block sizes come from the launchers' own ``_blocks`` helpers, so what is compiled is what would launch.
Integer arguments are compiled as i32 (Triton passes values below 2^31 that way; the kernels widen
every product that can exceed it to int64 themselves).

Run (without ``TRITON_INTERPRET``): ``python -m dsv.kernels.cuda_compile [--arch 90] [--only NAME] [--json]``
(a Markdown table, or with ``--json`` one document for scripts; about 15 s for every kernel on one core
with an empty Triton cache).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_REGISTERS",
    "MAX_SHARED_BYTES",
    "CompileResult",
    "compile_all",
    "compile_kernel",
    "ptx_mma_kind",
    "sass_mma_kinds",
]


@dataclass(frozen=True, kw_only=True)
class CompileResult:
    """What one kernel compiled to.

    ``registers`` and ``spill_bytes`` come from ``ptxas -v`` run with the flags Triton itself passes;
    ``cubin_registers`` and ``stack_bytes`` are read back from the cubin Triton built
    (``cuobjdump -res-usage``), so a disagreement between the two means the rerun no longer matches
    what Triton ships. ``mma`` names the matrix instructions in the PTX (``"wgmma"`` for Hopper's
    asynchronous warpgroup MMA, ``"mma.sync"`` for the Ampere-style warp MMA, both joined by ``+``, or
    ``"none"``); ``sass_mma`` lists the MMA opcodes of the SASS (``HGMMA``/``QGMMA`` for wgmma on
    bf16/fp8, ``HMMA`` for mma.sync), ``None`` where the disassembler is missing.
    """

    name: str
    config: str
    shared_bytes: int
    registers: int | None
    spill_bytes: int | None
    seconds: float
    mma: str = "none"
    sass_mma: str | None = None
    cubin_registers: int | None = None
    stack_bytes: int | None = None
    error: str | None = None  # why Triton or ptxas refused the kernel (then nothing else was measured)

    @property
    def uses_wgmma(self) -> bool:
        """Whether the kernel's matrix products run on wgmma (in the PTX, and in the SASS when read)."""
        return "wgmma" in self.mma.split("+") and (self.sass_mma is None or "GMMA" in self.sass_mma)

    def problems(self) -> list[str]:
        """Every way this kernel breaks the Hopper limits (empty when it fits)."""
        if self.error is not None:
            return [f"does not compile: {self.error.splitlines()[0]}"]
        found = []
        if self.spill_bytes is None or self.registers is None:
            found.append("no ptxas -v report")
        if self.spill_bytes:
            found.append(f"spills {self.spill_bytes} B/thread")
        if self.registers is not None and self.registers > MAX_REGISTERS:
            found.append(f"{self.registers} registers > {MAX_REGISTERS}")
        if self.shared_bytes > MAX_SHARED_BYTES:
            found.append(f"{self.shared_bytes / 1024:.1f} KiB shared > {MAX_SHARED_BYTES // 1024} KiB")
        if self.cubin_registers is not None and self.cubin_registers != self.registers:
            found.append(
                f"ptxas rerun says {self.registers} registers, Triton's cubin {self.cubin_registers}"
            )
        return found


MAX_REGISTERS = 255  # per thread, any CUDA GPU
MAX_SHARED_BYTES = 227 * 1024  # per block on H100/H200 (228 KiB per SM, 1 KiB reserved per block)


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
    return _inspect(
        *_triton_compile(kernel, pointers=pointers, constexprs=constexprs, floats=floats, num_warps=num_warps,
                         num_stages=num_stages, arch=arch, name=name),
        arch,
    )  # fmt: skip


def _triton_compile(
    kernel: Any,
    *,
    pointers: dict[str, str],
    constexprs: dict[str, Any],
    floats: tuple[str, ...] = (),
    num_warps: int = 4,
    num_stages: int = 3,
    arch: int = 90,
    name: str | None = None,
) -> tuple[Any, str, str, float]:
    """Triton's compile of one kernel: (the compiled kernel, its label, its shown config, seconds)."""
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
    shown = {k: v for k, v in constexprs.items() if k.startswith("BLOCK") or k in ("SPARSE", "FP8", "UE8M0")}
    config = ", ".join(f"{k}={v}" for k, v in shown.items()) + f", warps={num_warps}, stages={num_stages}"
    return compiled, name or kernel.__name__, config, seconds


def _inspect(compiled: Any, name: str, config: str, seconds: float, arch: int) -> CompileResult:
    """What the compiled kernel uses: a ``ptxas -v`` rerun on its PTX and ``cuobjdump`` on its cubin."""
    ptx = compiled.asm["ptx"]
    regs, spill = _resource_usage(ptx, arch, compiled.metadata)
    cubin_regs, stack, sass_mma = _cubin_usage(compiled.asm.get("cubin"))
    return CompileResult(
        name=name,
        config=config,
        shared_bytes=int(compiled.metadata.shared),
        registers=regs,
        spill_bytes=spill,
        seconds=seconds,
        mma=ptx_mma_kind(ptx),
        sass_mma=sass_mma,
        cubin_registers=cubin_regs,
        stack_bytes=stack,
    )


def ptx_mma_kind(ptx: str) -> str:
    """The matrix-multiply instructions a PTX listing uses: ``"wgmma"`` (``wgmma.mma_async``, Hopper's
    warpgroup MMA, tiles of 64 rows), ``"mma.sync"`` (the warp-level MMA of Ampere, which Hopper runs at a
    fraction of its tensor-core rate), both joined by ``+``, or ``"none"``."""
    kinds = [kind for kind, pattern in (("wgmma", r"\bwgmma\.mma_async\b"), ("mma.sync", r"\bmma\.sync\b"))
             if re.search(pattern, ptx)]  # fmt: skip
    return "+".join(kinds) or "none"


# SASS MMA opcodes: HGMMA/QGMMA/IGMMA/BGMMA are wgmma (bf16-fp16 / fp8 / int8 / binary), HMMA/QMMA/IMMA/
# DMMA/BMMA the warp-level mma.sync. ``HFMA2.MMA`` (a plain FMA on the MMA pipe) is not one of them.
_SASS_MMA = re.compile(r"\b([HQIB]GMMA|[HQIDB]MMA)\b")


def sass_mma_kinds(sass: str) -> str:
    """The MMA opcodes in a SASS listing, sorted and joined by ``+``, or ``"none"``."""
    return "+".join(sorted(set(_SASS_MMA.findall(sass)))) or "none"


def _ptxas_flags(metadata: Any, arch: int) -> list[str]:
    """The flags Triton's ``make_cubin`` gives ptxas (triton/backends/nvidia/compiler.py), so the
    ``-v`` report describes the cubin Triton ships; the register cross-check in ``problems`` fails when
    a Triton upgrade changes them."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    fmad = [] if getattr(metadata, "enable_fp_fusion", True) else ["--fmad=false"]
    extra = (getattr(metadata, "ptx_options", None) or "").split()
    gpu = f"--gpu-name={sm_arch_from_capability(arch)}"
    return ["-lineinfo", *fmad, "-v", "--regAllocOptLevel=2", *extra, gpu]


def _resource_usage(ptx: str, arch: int, metadata: Any = None) -> tuple[int | None, int | None]:
    """(registers per thread, spill-store bytes) from ``ptxas -v`` on the kernel's PTX, with the ptxas
    and the flags Triton itself uses for ``arch``; ``(None, None)`` when that tool is missing."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        tool = get_ptxas(arch).path
    except Exception:  # pragma: no cover - a triton build without the NVIDIA tools
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        done = subprocess.run(
            [tool, *_ptxas_flags(metadata, arch), str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
        )
    log = done.stdout + done.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    return (int(regs.group(1)) if regs else None), (int(spill.group(1)) if spill else None)


def _cubin_usage(cubin: bytes | None) -> tuple[int | None, int | None, str | None]:
    """(registers, stack bytes per thread, SASS MMA opcodes) of the cubin Triton built, from one
    ``cuobjdump -sass -res-usage`` (about 0.4 s a kernel: the sm_90 disassembler's start-up);
    ``(None, None, None)`` without cuobjdump."""
    if not cubin:
        return None, None, None
    from triton import knobs

    try:
        tool = knobs.nvidia.cuobjdump.path
    except Exception:  # pragma: no cover - a triton build without the NVIDIA tools
        return None, None, None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        done = subprocess.run([tool, "-sass", "-res-usage", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        return None, None, None
    usage = re.search(r"REG:(\d+) STACK:(\d+)", done.stdout)
    regs, stack = (int(usage.group(1)), int(usage.group(2))) if usage else (None, None)
    return regs, stack, sass_mma_kinds(done.stdout)


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
    for fp8, ranges, paged, s_q in ((False, False, False, S), (True, False, False, S), (True, True, False, S),
                                    (True, True, True, 1), (False, True, True, 1)):  # fmt: skip
        bt, bs, bh, bd, warps = ix._blocks(s_q, HI, DI, fp8)
        qt = "*fp8e4nv" if fp8 else bf16
        form = ("fp8" if fp8 else "bf16") + (", ranges" if ranges else "") + (", paged" if paged else "")
        specs.append((
            f"indexer fwd ({form})", ix._indexer_kernel,
            dict(pointers={"q_ptr": qt, "k_ptr": qt, "w_ptr": "*fp32", "qs_ptr": "*fp32", "ks_ptr": "*fp32",
                           "off_ptr": "*i64", "st_ptr": "*i32", "en_ptr": "*i32", "bt_ptr": "*i32",
                           "out_ptr": "*fp32"},
                 constexprs=dict(FP8=fp8, HAS_RANGES=ranges, PAGED=paged, PREC="tf32", UPCAST=False, BLOCK_T=bt,
                                 BLOCK_S=bs, BLOCK_H=bh, BLOCK_D=bd),
                 num_warps=warps),
        ))  # fmt: skip
    ptrs = {"q_ptr": bf16, "k_ptr": bf16, "w_ptr": "*fp32", "g_ptr": "*fp32", "off_ptr": "*i64",
            "st_ptr": "*i32", "en_ptr": "*i32", "dq_ptr": "*fp32", "dw_ptr": "*fp32", "dk_ptr": "*fp32"}  # fmt: skip
    for ranges in (False, True):
        bt_dq, bt_dk, bs_dq, bs_dk, bh, bd, warps = ix._bwd_blocks(HI, DI, ranges)
        for label, kern, bt, bs in (("indexer bwd dq/dw", ix._indexer_bwd_dq_kernel, bt_dq, bs_dq),
                                    ("indexer bwd dk", ix._indexer_bwd_dk_kernel, bt_dk, bs_dk)):  # fmt: skip
            meta = dict(HAS_RANGES=ranges, PREC="tf32", UPCAST=False, BLOCK_T=bt, BLOCK_S=bs, BLOCK_H=bh,
                        BLOCK_D=bd)  # fmt: skip
            specs.append((label + (" (ranges)" if ranges else ""), kern,
                          dict(pointers=ptrs, constexprs=meta, num_warps=warps)))  # fmt: skip
    for ranges in (False, True):  # k = 2048 picks, sorted in registers
        specs.append((
            f"topk radix{' (ranges)' if ranges else ''}", tk._topk_kernel,
            dict(pointers={"x_ptr": "*fp32", "st_ptr": "*i32", "en_ptr": "*i32", "cand_ptr": "*i32",
                           "out_ptr": "*i32"},
                 constexprs=dict(HAS_RANGES=ranges, SORT=True, K_PAD=2048, BLOCK=2048), num_warps=8),
        ))  # fmt: skip
    split_ptrs = {"x_ptr": "*fp32", "st_ptr": "*i32", "en_ptr": "*i32", "tot_ptr": "*i32", "ge_ptr": "*i32",
                  "cand_ptr": "*i32", "out_ptr": "*i32"}  # fmt: skip
    for label, kern, meta in (("hist", tk._topk_split_hist_kernel, {}),
                              ("collect", tk._topk_split_collect_kernel, dict(CHUNKS_PAD=64)),
                              ("finish", tk._topk_split_finish_kernel, dict(K_PAD=2048))):  # fmt: skip
        specs.append((
            f"topk split {label} (ranges)", kern,
            dict(pointers={a: t for a, t in split_ptrs.items() if a in kern.arg_names},
                 constexprs=dict(HAS_RANGES=True, BLOCK=2048, **meta), num_warps=8),
        ))  # fmt: skip
    fwd_ptrs = {"q_ptr": bf16, "kv_ptr": bf16, "kvs_ptr": bf16, "kvr_ptr": bf16, "idx_ptr": "*i32",
                "out_ptr": bf16, "lse_ptr": "*fp32"}  # fmt: skip
    fp8_ptrs = {**fwd_ptrs, "kv_ptr": "*fp8e4nv", "kvs_ptr": "*fp32", "out_ptr": "*fp32"}
    for label, ptrs, fp8 in (
        ("sparse_mla fwd", fwd_ptrs, False),
        ("sparse_mla fwd split-KV partial", {**fwd_ptrs, "out_ptr": "*fp32"}, False),
        ("sparse_mla fwd FP8-KV (split-KV partial)", fp8_ptrs, True),
    ):
        bh, bk, bdv, bdr, parts, warps = sm._blocks(H, D_V, D_R, fp8)
        meta = dict(HAS_ROPE=True, FP8=fp8, PREC="tf32", UPCAST=False, ALIGNED=True, EVEN_DV=True, EVEN_DR=True,
                    DV_PARTS=parts, BLOCK_H=bh, BLOCK_K=bk, BLOCK_DV=bdv, BLOCK_DR=bdr)  # fmt: skip
        specs.append((
            label, sm._sparse_mla_fwd_kernel,
            dict(pointers=ptrs, constexprs=meta, floats=("scale_log2",), num_warps=warps,
                 num_stages=sm.FWD_STAGES),
        ))  # fmt: skip
    ch, cc, cdv = sm._combine_blocks(H, D_V, 32)
    specs.append((
        "sparse_mla split-KV combine", sm._sparse_mla_combine_kernel,
        dict(pointers={"part_ptr": "*fp32", "plse_ptr": "*fp32", "out_ptr": bf16, "lse_ptr": "*fp32"},
             constexprs=dict(BLOCK_H=ch, BLOCK_C=cc, BLOCK_DV=cdv)),
    ))  # fmt: skip
    (bh, bk, bdv, bdr, bc, warps), (kh, kk, kc, kwarps) = sm._bwd_blocks(H, D_V, D_R)
    bwd_ptrs = {"q_ptr": bf16, "kv_ptr": bf16, "idx_ptr": "*i32", "do_ptr": bf16, "lse_ptr": "*fp32",
                "delta_ptr": "*fp32", "dq_ptr": "*fp32", "dkv_ptr": "*fp32", "part_ptr": "*fp32"}  # fmt: skip
    specs.append((
        "sparse_mla bwd dq", sm._sparse_mla_bwd_dq_kernel,
        dict(pointers={a: t for a, t in bwd_ptrs.items() if a in sm._sparse_mla_bwd_dq_kernel.arg_names},
             constexprs=dict(HAS_ROPE=True, PREC="tf32", UPCAST=False, ALIGNED=True, EVEN_DV=True, EVEN_DR=True,
                             BLOCK_H=bh, BLOCK_K=bk, BLOCK_DV=bdv, BLOCK_DR=bdr, BLOCK_C=bc),
             floats=("sm_scale", "scale_log2"), num_warps=warps, num_stages=sm.BWD_STAGES),
    ))  # fmt: skip
    for det in (False, True):
        specs.append((
            f"sparse_mla bwd dkv{' (deterministic)' if det else ''}", sm._sparse_mla_bwd_dkv_kernel,
            dict(pointers={a: t for a, t in bwd_ptrs.items() if a != "dq_ptr"},
                 constexprs=dict(DETERMINISTIC=det, HAS_ROPE=True, PREC="tf32", UPCAST=False, ALIGNED=True,
                                 EVEN_DV=True, EVEN_DR=True, BLOCK_H=kh, BLOCK_K=kk, BLOCK_DR=bdr, BLOCK_C=kc),
                 floats=("sm_scale", "scale_log2"), num_warps=kwarps, num_stages=sm.BWD_STAGES),
        ))  # fmt: skip
    specs.append((
        "sparse_mla bwd ordered dkv reduce", sm._dkv_ordered_reduce_kernel,
        dict(pointers={"part_ptr": "*fp32", "order_ptr": "*i64", "key_ptr": "*i64", "start_ptr": "*i64",
                       "dkv_ptr": "*fp32"},
             constexprs=dict(BLOCK_D=256)),
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


def compile_all(*, arch: int = 90, only: str | None = None, jobs: int | None = None) -> list[CompileResult]:
    """Compile every kernel (or those whose label contains ``only``) at the V3.2 shapes, in table order.

    ``jobs`` worker processes (default: the usable CPUs, at most 8) compile one kernel each at a time:
    Triton's compile holds the GIL, and the slowest kernels take 5-10 s each. A kernel that does not
    compile gets a row with its ``error`` and the others still compile.
    """
    import multiprocessing

    chosen = [i for i, (label, _, _) in enumerate(_specs()) if only is None or only in label]
    jobs = min(len(chosen), jobs or min(8, len(os.sched_getaffinity(0))))
    if jobs <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [_compile_one(i, arch) for i in chosen]
    # fork: the workers start with the kernels imported (a fresh interpreter would re-import torch and
    # triton, ~3 s each); nothing here has touched a GPU, so nothing CUDA-side is copied
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.starmap(_compile_one, [(i, arch) for i in chosen], chunksize=1)


def _compile_one(index: int, arch: int) -> CompileResult:
    """Compile and inspect the ``index``-th kernel of :func:`_specs` (in a worker process)."""
    label, kern, kw = _specs()[index]
    try:
        compiled = _triton_compile(kern, arch=arch, name=label, **kw)
    except Exception as exc:  # CompilationError, PTXASError, ...: report it in its row
        return _failed(label, kw, exc)
    return _inspect(*compiled, arch)


def _failed(label: str, kw: dict[str, Any], exc: Exception) -> CompileResult:
    """The row of a kernel that does not compile: the error's type and message, nothing measured."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    # Triton's CompilationError starts with the source location and ends with the reason
    reason = f"{type(exc).__name__}: {lines[-1].strip() if lines else ''}"
    return CompileResult(
        name=label, config=f"warps={kw.get('num_warps', 4)}, stages={kw.get('num_stages', 3)}", shared_bytes=0,
        registers=None, spill_bytes=None, seconds=0.0, error="\n".join([reason, *lines])[:4000],
    )  # fmt: skip


def _tool_version(arch: int) -> str | None:
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        return get_ptxas(arch).version
    except Exception:  # pragma: no cover - a triton build without the NVIDIA tools
        return None


def main(argv: list[str] | None = None) -> int:
    """Print a Markdown table (or, with ``--json``, a JSON document) of the compile results."""
    from dsv.kernels._checks import interpreting

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100/H200)")
    parser.add_argument("--only", default=None, help="compile only kernels whose label contains this")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document (limits, versions, one row per kernel)"
    )
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPUs, at most 8)")
    args = parser.parse_args(argv)
    if interpreting():
        print("error: unset TRITON_INTERPRET (the interpreter replaces the compiler)", file=sys.stderr)
        return 1
    labels = [label for label, _, _ in _specs()]
    if args.only is not None and not any(args.only in label for label in labels):
        print(f"error: no kernel label contains {args.only!r}; labels: {', '.join(labels)}", file=sys.stderr)
        return 2
    if args.json:
        import triton

        rows = [
            asdict(r) | {"uses_wgmma": r.uses_wgmma, "problems": r.problems()}
            for r in compile_all(arch=args.arch, only=args.only, jobs=args.jobs)
        ]
        doc = {
            "arch": args.arch,
            "triton": triton.__version__,
            "ptxas": _tool_version(args.arch),
            "limits": {"registers": MAX_REGISTERS, "shared_bytes": MAX_SHARED_BYTES, "spill_bytes": 0},
            "kernels": rows,
        }
        print(json.dumps(doc, indent=1))
        return 1 if any(r["error"] for r in rows) else 0
    print(
        f"| kernel (sm_{args.arch}, V3.2 shapes) | config | shared KiB | regs/thread | spill B | stack B "
        "| mma (PTX) | SASS mma | compile s |"
    )
    print("|---|---|---:|---:|---:|---:|---|---|---:|")
    results = compile_all(arch=args.arch, only=args.only, jobs=args.jobs)
    for r in results:
        if r.error is not None:
            print(f"| {r.name} | {r.config} | does not compile: {r.error.splitlines()[0]} | | | | | | |")
            continue
        print(
            f"| {r.name} | {r.config} | {r.shared_bytes / 1024:.1f} | {r.registers} | {r.spill_bytes} | "
            f"{r.stack_bytes} | {r.mma} | {r.sass_mma} | {r.seconds:.1f} |"
        )
    failed = [r for r in results if r.error is not None]
    for r in failed:
        print(f"\n{r.name}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
