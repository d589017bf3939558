"""``dsv bench kernels``: DSA kernels vs. dense attention across context lengths.

For each model shape (a dsv.core preset: ``small``, ``v32`` = 128 heads, 512+64 latent, k=2048) and
each context length it times, on the same inputs and in the same run:

- ``indexer``  lightning-indexer scores for a prefill (causal pairs counted in FLOP/s); from 64K
  context on, for the last queries only (``queries`` column, see :func:`query_chunk`): the full
  ``[L, L]`` fp32 score matrix is 64 GiB at 128K;
- ``topk``     top-k selection over those score rows;
- ``sparse_prefill`` sparse MLA forward (absorbed form, K = min(index_topk, L) picks per query);
- ``dense_prefill``  torch SDPA causal attention in MHA form (qk = nope+rope, v = v_head_dim), the
  dense baseline (flash backend on CUDA where it accepts the shapes);
- ``sparse_decode`` / ``dense_decode`` one new token per sequence against an L-token latent cache
  (dense: SDPA with the heads as the queries of the one shared latent head, as FlashMLA decodes).

Implementation: ``triton`` (dsv.kernels) on CUDA, ``torch`` (the dsv.core references) anywhere. On
CUDA times come from ``triton.testing.do_bench`` (median) and memory from
``torch.cuda.max_memory_allocated``; on CPU from ``time.perf_counter`` (median of ``--repeats``) with
no memory column. ``--backend triton --device cpu`` runs the kernels in Triton's interpreter — only
useful at tiny sizes to check the code path. Writes ``kernels_bench.json`` and ``kernels_bench.png``
to ``--out``.

Run: ``dsv bench kernels --device cpu --preset small --contexts 1024,2048``.
"""

# ruff: noqa: B023  (each timed closure runs inside the iteration that builds it)
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import typer

__all__ = ["BenchShape", "bench_app", "query_chunk", "run_benchmarks"]


@dataclass(frozen=True, kw_only=True)
class BenchShape:
    """The attention dimensions a benchmark needs, read from a dsv.core preset."""

    name: str
    heads: int
    kv_lora_rank: int
    rope_dim: int
    nope_dim: int
    v_head_dim: int
    index_heads: int
    index_dim: int
    index_topk: int

    @property
    def d_qk(self) -> int:
        return self.kv_lora_rank + self.rope_dim

    @classmethod
    def from_preset(cls, name: str) -> BenchShape:
        from dsv.core import presets

        cfg = presets.preset(name)
        return cls(
            name=name,
            heads=cfg.num_attention_heads,
            kv_lora_rank=cfg.kv_lora_rank,
            rope_dim=cfg.qk_rope_head_dim,
            nope_dim=cfg.qk_nope_head_dim,
            v_head_dim=cfg.v_head_dim,
            index_heads=cfg.index_n_heads,
            index_dim=cfg.index_head_dim,
            index_topk=cfg.index_topk,
        )


def _timer(device: str, repeats: int) -> Callable[[Callable[[], object]], float]:
    """Returns a function that times a closure in milliseconds (median)."""
    if device == "cuda":
        import triton.testing

        def cuda_time(fn: Callable[[], object]) -> float:
            return float(
                triton.testing.do_bench(fn, warmup=10, rep=max(50, 20 * repeats), return_mode="median")
            )

        return cuda_time

    def cpu_time(fn: Callable[[], object]) -> float:
        fn()  # warm-up (allocations, interpreter caches)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_time


def run_benchmarks(
    *,
    shapes: list[BenchShape],
    contexts: list[int],
    batch: int,
    device: str,
    backend: str,
    repeats: int,
    dtype_name: str = "bf16",
    ops: tuple[str, ...] = (
        "indexer",
        "topk",
        "sparse_prefill",
        "dense_prefill",
        "sparse_decode",
        "dense_decode",
    ),
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Time every op for every (shape, context); returns one record per measurement."""
    import torch
    import torch.nn.functional as F

    from dsv.core import attention as ref

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    if backend == "triton":
        import dsv.kernels as kern
    timer = _timer(device, repeats)
    gen = torch.Generator(device=device).manual_seed(0)
    records: list[dict[str, Any]] = []

    def rand(*size: int, dt: torch.dtype = dtype) -> torch.Tensor:
        # drawn in the target dtype: an fp32 draw of the 128K prefill query (128 heads x 576) alone is 39 GB
        return torch.randn(*size, generator=gen, device=device, dtype=dt)

    def measure(
        shape: BenchShape,
        L: int,
        op: str,
        impl: str,
        fn: Callable[[], object],
        flops: float,
        nbytes: float,
        queries: int | None = None,
    ) -> None:
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # freed blocks of the previous op must not fragment this one's
            torch.cuda.reset_peak_memory_stats()
        ms = timer(fn)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
        records.append(
            {
                "preset": shape.name, "context": L, "batch": batch, "op": op, "impl": impl, "ms": ms,
                "tflops": flops / (ms * 1e-3) / 1e12 if flops else None,
                "gbps": nbytes / (ms * 1e-3) / 1e9 if nbytes else None,
                "peak_mib": peak, "device": device, "dtype": dtype_name,
                "queries": L if queries is None else queries,
            }
        )  # fmt: skip
        if progress:
            progress(f"{shape.name} L={L} {op} [{impl}] {ms:.2f} ms")

    elt = torch.finfo(dtype).bits // 8
    for shape in shapes:
        H, D, dv = shape.heads, shape.d_qk, shape.kv_lora_rank
        for L in contexts:
            B = batch
            K = min(shape.index_topk, L)
            sm = D**-0.5
            if "indexer" in ops or "topk" in ops:
                # the last `nq` queries of the context (all of it up to SCORE_BYTES of fp32 scores): a full
                # 128K x 128K score matrix is 64 GiB, more than the benchmark should hold on an 80 GB card;
                # the last queries see the most keys, so this is the expensive end of the prefill
                nq = query_chunk(B, L)
                qi, ki = rand(B, nq, shape.index_heads, shape.index_dim), rand(B, L, shape.index_dim)
                wi = rand(B, nq, shape.index_heads, dt=torch.float32)
                off = L - nq
                idx_fn = (lambda: kern.indexer_scores(qi, ki, wi, q_offset=off)) if backend == "triton" else (lambda: ref.indexer_scores_reference(qi, ki, wi, off))  # fmt: skip
                if "indexer" in ops:
                    visible_pairs = nq * off + nq * (nq + 1) / 2  # causal (query, key) pairs computed
                    flops = 2 * B * visible_pairs * shape.index_heads * shape.index_dim
                    measure(
                        shape, L, "indexer", backend, idx_fn, flops,
                        (qi.numel() + ki.numel()) * elt + 4 * B * nq * L, queries=nq,
                    )  # fmt: skip
                scores = idx_fn()
                del qi, ki, wi
                if "topk" in ops:
                    topk_fn = (lambda: kern.topk(scores, K)) if backend == "triton" else (lambda: ref.select_topk_reference(scores, K))  # fmt: skip
                    measure(shape, L, "topk", backend, topk_fn, 0.0, 4 * scores.numel(), queries=nq)
                del scores
            if "sparse_prefill" in ops:
                q, kv = rand(B, L, H, D), rand(B, L, D)
                # a causal selection: K distinct visible keys per query (the most recent ones; cost is
                # independent of which keys are picked), -1 where fewer than K are visible
                pos = torch.arange(L, device=device).view(L, 1)
                idx = (
                    (pos - torch.arange(K, device=device).view(1, K))
                    .clamp_min(-1)
                    .int()
                    .expand(B, L, K)
                    .contiguous()
                )
                sp_fn = (lambda: kern.sparse_mla(q, kv, idx, sm_scale=sm, d_v=dv)) if backend == "triton" else (lambda: ref.sparse_mla_reference(q, kv, idx, sm, dv))  # fmt: skip
                flops = 2 * B * L * H * K * (D + dv)
                measure(shape, L, "sparse_prefill", backend, sp_fn, flops, B * L * K * D * elt)
                del q, kv, idx
            if "dense_prefill" in ops:
                dqk = shape.nope_dim + shape.rope_dim
                qd, kd, vd = rand(B, H, L, dqk), rand(B, H, L, dqk), rand(B, H, L, shape.v_head_dim)

                def dense() -> object:
                    if device == "cuda":
                        from torch.nn.attention import SDPBackend, sdpa_kernel

                        with sdpa_kernel(
                            [
                                SDPBackend.FLASH_ATTENTION,
                                SDPBackend.EFFICIENT_ATTENTION,
                                SDPBackend.CUDNN_ATTENTION,
                            ]
                        ):
                            return F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
                    return F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)

                flops = 2 * B * H * L * L * (dqk + shape.v_head_dim) / 2
                measure(
                    shape,
                    L,
                    "dense_prefill",
                    "sdpa",
                    dense,
                    flops,
                    (qd.numel() + kd.numel() + vd.numel()) * elt,
                )
                del qd, kd, vd
            if "sparse_decode" in ops or "dense_decode" in ops:
                q1, cache = rand(B, 1, H, D), rand(B, L, D)
                if "sparse_decode" in ops:
                    idx1 = (
                        torch.randperm(L, generator=gen, device=device)[:K]
                        .int()
                        .view(1, 1, K)
                        .expand(B, 1, K)
                        .contiguous()
                    )
                    dec_fn = (lambda: kern.sparse_mla(q1, cache, idx1, sm_scale=sm, d_v=dv)) if backend == "triton" else (lambda: ref.sparse_mla_reference(q1, cache, idx1, sm, dv))  # fmt: skip
                    measure(
                        shape, L, "sparse_decode", backend, dec_fn, 2 * B * H * K * (D + dv), B * K * D * elt
                    )
                if "dense_decode" in ops:
                    # absorbed MQA decode as FlashMLA runs it: the heads are the queries of one shared
                    # latent "head", so nothing is repeated per head (enable_gqa on the math backend
                    # would copy the 128K cache 128 times) and no mask is needed (the token sees all L)
                    qt, kt, vt = q1.view(B, 1, H, D), cache.unsqueeze(1), cache[..., :dv].unsqueeze(1)

                    def dense_dec() -> object:
                        return F.scaled_dot_product_attention(qt, kt, vt, scale=sm)

                    measure(
                        shape, L, "dense_decode", "sdpa", dense_dec, 2 * B * H * L * (D + dv), B * L * D * elt
                    )
                del q1, cache
    for r in records:  # speed-up over the dense baseline measured in the same run
        base = (
            "dense_prefill"
            if r["op"] == "sparse_prefill"
            else "dense_decode"
            if r["op"] == "sparse_decode"
            else None
        )
        match = [
            x
            for x in records
            if base and x["op"] == base and x["preset"] == r["preset"] and x["context"] == r["context"]
        ]
        r["speedup_vs_dense"] = match[0]["ms"] / r["ms"] if match else None
    return records


SCORE_BYTES = 8 << 30  # fp32 indexer scores the benchmark holds at once (8 GiB)


def query_chunk(batch: int, context: int) -> int:
    """Queries whose ``[batch, queries, context]`` fp32 scores fit in ``SCORE_BYTES`` (all up to 32K context)."""
    return max(1, min(context, SCORE_BYTES // (4 * batch * context)))


def _plot(records: list[dict[str, Any]], path: Path) -> None:

    from dsv.core.plot import pyplot, save_png

    plt = pyplot()
    if plt is None:
        print("matplotlib not installed: no plot written")
        return

    presets = sorted({r["preset"] for r in records})
    fig, axes = plt.subplots(1, len(presets), figsize=(6 * len(presets), 4), squeeze=False)
    for ax, name in zip(axes[0], presets, strict=True):
        for op in ("sparse_prefill", "dense_prefill", "sparse_decode", "dense_decode", "indexer"):
            pts = sorted((r["context"], r["ms"]) for r in records if r["preset"] == name and r["op"] == op)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=op)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="context length",
            ylabel="ms (median)",
            title=f"{name} ({records[0]['device']})",
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=110)


def _fail(msg: str, code: int = 2) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise typer.Exit(code)


def bench_app(
    preset: str = typer.Option(
        "small", help="Comma-separated dsv.core presets: small, v32 (real V3.2 shapes)."
    ),
    contexts: str = typer.Option(
        "", help="Comma-separated context lengths (default: 4K..128K on CUDA, 512..2048 on CPU)."
    ),
    batch: int = typer.Option(1, min=1, help="Sequences per batch (prefill) / concurrent decodes."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    backend: str = typer.Option("auto", help="auto (triton on CUDA, torch on CPU), triton or torch."),
    dtype: str = typer.Option("bf16", help="bf16 or fp32."),
    ops: str = typer.Option(
        "",
        help="Comma-separated subset of: indexer, topk, sparse_prefill, dense_prefill, sparse_decode, dense_decode.",
    ),
    repeats: int = typer.Option(5, min=1, help="Timed runs per measurement (median reported)."),
    out: Path = typer.Option(
        Path("bench-out/kernels"), help="Directory for kernels_bench.json and kernels_bench.png."
    ),
) -> None:
    """DSA kernels (indexer, top-k, sparse MLA prefill/decode) vs. dense SDPA across context lengths."""
    # every flag is checked before torch is imported, so a typo fails in well under a second
    all_ops = ("indexer", "topk", "sparse_prefill", "dense_prefill", "sparse_decode", "dense_decode")
    if device not in ("auto", "cpu", "cuda"):
        _fail(f"--device must be auto, cpu or cuda, got {device!r}")
    if backend not in ("auto", "torch", "triton"):
        _fail(f"--backend must be auto, torch or triton, got {backend!r}")
    if dtype not in ("bf16", "fp32"):
        _fail(f"--dtype must be bf16 or fp32, got {dtype!r}")
    chosen_ops = tuple(o.strip() for o in ops.split(",") if o.strip()) or all_ops
    if bad := [o for o in chosen_ops if o not in all_ops]:
        _fail(f"unknown --ops {', '.join(bad)}; choose from {', '.join(all_ops)}")
    try:
        ctx = [int(c) for c in contexts.split(",") if c.strip()]
    except ValueError:
        _fail(f"--contexts must be comma-separated integers, got {contexts!r}")
    if any(c < 1 for c in ctx):
        _fail("--contexts must be positive")

    import torch
    from rich.console import Console
    from rich.table import Table

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        _fail("--device cuda but no CUDA device is visible; use --device cpu", 1)
    if backend == "auto":
        backend = "triton" if device == "cuda" else "torch"
    if backend == "triton" and device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before dsv.kernels imports triton
    ctx = ctx or ([4096, 8192, 16384, 32768, 65536, 131072] if device == "cuda" else [512, 1024, 2048])
    try:
        shapes = [BenchShape.from_preset(p.strip()) for p in preset.split(",") if p.strip()]
    except (KeyError, ValueError) as exc:
        _fail(f"unknown --preset {preset!r} ({exc}); use small, v32 or a comma-separated list")

    console = Console()
    with console.status("benchmarking...") as status:
        records = run_benchmarks(
            shapes=shapes, contexts=ctx, batch=batch, device=device, backend=backend, repeats=repeats,
            dtype_name=dtype, ops=chosen_ops, progress=lambda m: status.update(m),
        )  # fmt: skip
    table = Table(title=f"dsv bench kernels ({device}, {dtype}, batch {batch}, median of {repeats})")
    for col in (
        "preset",
        "context",
        "queries",
        "op",
        "impl",
        "ms",
        "TFLOP/s",
        "GB/s",
        "peak MiB",
        "vs dense",
    ):
        table.add_column(col, justify="right" if col not in ("preset", "op", "impl") else "left")

    def fmt(x: float | None, spec: str) -> str:
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    for r in records:
        table.add_row(
            r["preset"], str(r["context"]), str(r["queries"]), r["op"], r["impl"], fmt(r["ms"], ".3f"), fmt(r["tflops"], ".4f"),
            fmt(r["gbps"], ".1f"), fmt(r["peak_mib"], ".0f"), fmt(r["speedup_vs_dense"], ".2f") + ("x" if r["speedup_vs_dense"] else ""),
        )  # fmt: skip
    console.print(table)
    from dsv.core.checkpoint import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "backend": backend, "dtype": dtype, "batch": batch, "repeats": repeats,
            "shapes": [asdict(s) for s in shapes], "torch": torch.__version__}  # fmt: skip
    atomic_write_bytes(
        out / "kernels_bench.json", json.dumps({"meta": meta, "records": records}, indent=2).encode()
    )
    _plot(records, out / "kernels_bench.png")
    console.print(f"wrote {out / 'kernels_bench.json'} and {out / 'kernels_bench.png'}")
