"""``dsv bench fp8-gemm``: the FP8 block-scaled GEMM against bf16 ``torch.matmul`` at V3.2's shapes.

For every FP8 projection of one V3.2 layer (MLA, indexer, dense FFN, routed expert; shapes read from
the preset by :func:`dsv.core.inventory.state_shapes`) and every token count it times, on the same
inputs in the same run:

- ``bf16``        ``x @ w.T`` with bf16 ``x`` and ``w`` (cuBLAS on a GPU): the baseline;
- ``fp8_linear``  :func:`dsv.kernels.fp8_linear`: per-token activation quantisation + the GEMM, what a
  layer holding FP8 weights runs;
- ``fp8_gemm``    :func:`dsv.kernels.fp8_gemm` alone on pre-quantised activations.

Each FP8 row also gives its error: relative L2 distance to dequantise-then-matmul in fp32 (the
kernel's own error: summation order and the bf16 output) and to the unquantised bf16 layer (what FP8
costs in accuracy). On CUDA times are ``triton.testing.do_bench`` medians; on CPU the kernels run in
Triton's interpreter (tiny shapes only, to check the code path). Writes ``fp8_gemm_bench.json`` and
``fp8_gemm_bench.md`` to ``--out``.

Run: ``dsv bench fp8-gemm`` (GPU), ``dsv bench fp8-gemm --device cpu --preset tiny --tokens 1,16``.
"""

# ruff: noqa: B023  (each timed closure runs inside the iteration that builds it)
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer

__all__ = ["LAYERS", "bench_app", "layer_shapes", "run_fp8_benchmarks"]

# (label, parameter name with {dense}/{moe} for the first dense / MoE layer); shapes come from the preset
LAYERS = (
    ("q_a_proj", "model.layers.{moe}.self_attn.q_a_proj.weight"),
    ("q_b_proj", "model.layers.{moe}.self_attn.q_b_proj.weight"),
    ("kv_a_proj", "model.layers.{moe}.self_attn.kv_a_proj_with_mqa.weight"),
    ("kv_b_proj", "model.layers.{moe}.self_attn.kv_b_proj.weight"),
    ("o_proj", "model.layers.{moe}.self_attn.o_proj.weight"),
    ("indexer.wq_b", "model.layers.{moe}.self_attn.indexer.wq_b.weight"),
    ("indexer.wk", "model.layers.{moe}.self_attn.indexer.wk.weight"),
    ("dense gate/up", "model.layers.{dense}.mlp.gate_proj.weight"),
    ("dense down", "model.layers.{dense}.mlp.down_proj.weight"),
    ("expert gate/up", "model.layers.{moe}.mlp.experts.0.gate_proj.weight"),
    ("expert down", "model.layers.{moe}.mlp.experts.0.down_proj.weight"),
)


def layer_shapes(preset: str) -> list[tuple[str, int, int]]:
    """``(label, N, K)`` of each FP8 projection in :data:`LAYERS` that the preset has."""
    from dsv.core import presets
    from dsv.core.inventory import state_shapes

    cfg = presets.preset(preset)
    shapes, _ = state_shapes(cfg)
    dense = 0 if cfg.first_k_dense_replace > 0 else -1
    moe = cfg.first_k_dense_replace if cfg.n_routed_experts > 0 else -1
    out = []
    for label, pattern in LAYERS:
        shape = shapes.get(pattern.format(dense=dense, moe=moe))
        if shape is not None:
            out.append((label, shape[0], shape[1]))
    return out


def _rel(a: Any, b: Any) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def run_fp8_benchmarks(
    *, preset: str, tokens: list[int], device: str, repeats: int, layers: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """Time bf16 matmul, fp8_linear and fp8_gemm for every (projection, token count); one record each."""
    import torch

    import dsv.kernels as kern
    from dsv.core.fp8 import quantize_fp8
    from dsv.kernels.bench import _timer
    from dsv.kernels.ops.fp8_gemm.reference import act_quant_reference, fp8_gemm_reference

    timer = _timer(device, repeats)
    gen = torch.Generator(device=device).manual_seed(0)
    records: list[dict[str, Any]] = []
    for label, N, K in layer_shapes(preset):
        if layers and label not in layers:
            continue
        w = (torch.randn(N, K, generator=gen, device=device) * K**-0.5).to(torch.bfloat16)
        w_q, w_s = quantize_fp8(w)
        for M in tokens:
            x = torch.randn(M, K, generator=gen, device=device, dtype=torch.bfloat16)
            x_q, x_s = kern.act_quant(x)
            y = kern.fp8_linear(x, w_q, w_s)
            exact = fp8_gemm_reference(*act_quant_reference(x), w_q, w_s, out_dtype=torch.float32)
            full = x.float() @ w.float().T
            errors = {"err_vs_dequant": _rel(y, exact), "err_vs_bf16_layer": _rel(y, full)}
            fns = {
                "bf16": lambda: torch.matmul(x, w.T),
                "fp8_linear": lambda: kern.fp8_linear(x, w_q, w_s),
                "fp8_gemm": lambda: kern.fp8_gemm(x_q, x_s, w_q, w_s),
            }
            base = None
            for impl, fn in fns.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                ms = timer(fn)
                base = ms if impl == "bf16" else base
                records.append({
                    "preset": preset, "layer": label, "M": M, "N": N, "K": K, "impl": impl, "ms": ms,
                    "tflops": 2 * M * N * K / (ms * 1e-3) / 1e12, "speedup_vs_bf16": base / ms,
                    "device": device, **({} if impl == "bf16" else errors),
                })  # fmt: skip
    return records


def markdown(records: list[dict[str, Any]], title: str) -> str:
    """The records as one Markdown table (bf16, fp8_linear and fp8_gemm side by side)."""
    lines = [f"### {title}", "",
             "| layer | M (tokens) | N x K | bf16 ms | fp8_linear ms | fp8_gemm ms | fp8_linear vs bf16 | "
             "fp8_gemm TFLOP/s | err vs dequant | err vs bf16 layer |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    rows: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for r in records:
        rows.setdefault((r["layer"], r["M"]), {})[r["impl"]] = r
    for (layer, M), by in rows.items():
        b, lin, gemm = by["bf16"], by["fp8_linear"], by["fp8_gemm"]
        lines.append(
            f"| {layer} | {M} | {b['N']} x {b['K']} | {b['ms']:.4f} | {lin['ms']:.4f} | {gemm['ms']:.4f} | "
            f"{lin['speedup_vs_bf16']:.2f}x | {gemm['tflops']:.1f} | {lin['err_vs_dequant']:.1e} | "
            f"{lin['err_vs_bf16_layer']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def _fail(msg: str, code: int = 2) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise typer.Exit(code)


def bench_app(
    preset: str = typer.Option(
        "", help="dsv.core preset whose layer shapes to use (default: v32 on CUDA, tiny on CPU)."
    ),
    tokens: str = typer.Option(
        "", help="Comma-separated token counts M (default: 1,16,128,1024,4096 on CUDA, 1,16 on CPU)."
    ),
    device: str = typer.Option("auto", help="auto, cpu (Triton interpreter, tiny shapes) or cuda."),
    layers: str = typer.Option(
        "", help=f"Comma-separated subset of: {', '.join(label for label, _ in LAYERS)}."
    ),
    repeats: int = typer.Option(5, min=1, help="Timed runs per measurement (median reported)."),
    out: Path = typer.Option(Path("bench-out/fp8-gemm"), help="Directory for fp8_gemm_bench.json and .md."),
) -> None:
    """FP8 block-scaled GEMM (+ activation quantisation) vs. bf16 torch.matmul at V3.2's projection shapes."""
    # flags are checked before torch is imported, so a typo fails at once
    if device not in ("auto", "cpu", "cuda"):
        _fail(f"--device must be auto, cpu or cuda, got {device!r}")
    known = [label for label, _ in LAYERS]
    chosen = tuple(x.strip() for x in layers.split(",") if x.strip())
    if bad := [x for x in chosen if x not in known]:
        _fail(f"unknown --layers {', '.join(bad)}; choose from {', '.join(known)}")
    try:
        toks = [int(t) for t in tokens.split(",") if t.strip()]
    except ValueError:
        _fail(f"--tokens must be comma-separated integers, got {tokens!r}")
    if any(t < 1 for t in toks):
        _fail("--tokens must be positive")

    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        _fail("--device cuda but no CUDA device is visible; use --device cpu", 1)
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before dsv.kernels imports triton
    preset = preset or ("v32" if device == "cuda" else "tiny")
    toks = toks or ([1, 16, 128, 1024, 4096] if device == "cuda" else [1, 16])
    try:
        shapes = layer_shapes(preset)
    except (KeyError, ValueError) as exc:
        _fail(f"unknown --preset {preset!r} ({exc}); use tiny, small or v32")
    if not shapes:
        _fail(f"preset {preset!r} has none of the FP8 projections")
    records = run_fp8_benchmarks(preset=preset, tokens=toks, device=device, repeats=repeats, layers=chosen)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    table = markdown(records, f"FP8 GEMM vs bf16 matmul, preset {preset}, {name}, median of {repeats}")
    print(table)
    from dsv.core.checkpoint import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": name, "preset": preset, "tokens": toks, "repeats": repeats, "torch": torch.__version__}
    atomic_write_bytes(
        out / "fp8_gemm_bench.json", json.dumps({"meta": meta, "records": records}, indent=2).encode()
    )
    atomic_write_bytes(out / "fp8_gemm_bench.md", table.encode())
    print(f"wrote {out / 'fp8_gemm_bench.json'} and {out / 'fp8_gemm_bench.md'}")
