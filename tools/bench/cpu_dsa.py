"""The compiled CPU DSA kernel (dsv.kernels.cpu) against the torch chain it replaces, in one process.

Two levels, each alternating the two paths run by run (``DSV_KERNELS=torch`` switches the kernel
off; every other op is the same), one torch thread, medians and the median of per-run ratios:

- **op**: ``dsv.core.attention.fused_sparse_attention`` (indexer head-sum, causal mask, top-k and
  sparse attention over the latent rows) at decode shapes of the tiny, small and v32 presets and
  prefill chunks of tiny and small. With the kernel, tiny's attention runs in C too; the wider ones
  are selected in C and attended by torch (``FUSED_ATTEND_MAX``). The torch chain is the inference
  path without the kernel: indexer scores, ``topk``, row gather and the CPU flash-attention op.
- **engine**: the serve engine on the tiny preset, 32 sequences x 512 prompt + 128 output tokens,
  in-process (no HTTP), fresh random prompts every wave.

Prints a Markdown section; ``--write F`` also writes it to F and a PNG of the speed-ups beside it::

    OMP_NUM_THREADS=1 python tools/bench/cpu_dsa.py --runs 5
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

MODES = ("kernel", "torch")  # DSV_KERNELS=auto uses the CPU kernel; torch forces the chain


def _set_mode(mode: str) -> None:
    os.environ["DSV_KERNELS"] = "auto" if mode == "kernel" else "torch"


def _op_cases() -> list[tuple[str, str, dict[str, int]]]:
    """(label, preset, sizes): decode rows of several presets, and one prefill chunk of tiny's."""
    return [
        ("tiny decode, 32 rows x 640 keys", "tiny", {"B": 32, "S": 1, "T": 640}),
        ("tiny prefill chunk, 4 x 256 queries x 512 keys", "tiny", {"B": 4, "S": 256, "T": 512}),
        ("small decode, 8 rows x 2048 keys", "small", {"B": 8, "S": 1, "T": 2048}),
        ("small prefill chunk, 256 queries x 1024 keys", "small", {"B": 1, "S": 256, "T": 1024}),
        ("v32 decode, 1 row x 8192 keys", "v32", {"B": 1, "S": 1, "T": 8192}),
    ]


def _op_runner(preset_name: str, B: int, S: int, T: int) -> Callable[[], object]:
    from dsv.core import attention
    from dsv.core.presets import preset

    cfg = preset(preset_name)
    g = torch.Generator().manual_seed(0)
    D = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    HI, DI = cfg.index_n_heads, cfg.index_head_dim
    iq, ik = torch.randn(B, S, HI, DI, generator=g), torch.randn(B, T, DI, generator=g)
    iw = torch.randn(B, S, HI, generator=g) * (HI * DI) ** -0.5
    q, kv = torch.randn(B, S, cfg.num_attention_heads, D, generator=g), torch.randn(B, T, D, generator=g)
    off = torch.full((B,), T - S)

    def run() -> object:
        return attention.fused_sparse_attention(
            iq, ik, iw, off, q, kv, cfg.index_topk, D**-0.5, cfg.kv_lora_rank
        )

    return run


def _time(fn: Callable[[], object], reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3  # ms


def _paired(results: dict[str, list[float]], lower_is_better: bool) -> float:
    """Median over runs of kernel-vs-torch speed-up (> 1: the kernel is faster)."""
    pairs = zip(results["kernel"], results["torch"], strict=True)
    return statistics.median((b / a) if lower_is_better else (a / b) for a, b in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()

    import dsv.kernels.cpu as cpu
    from dsv.core.allocator import tune_cpu_allocator
    from dsv.core.bench import host
    from dsv.core.checkpoint import atomic_write_bytes, load_pretrained
    from dsv.core.plot import pyplot, save_png
    from dsv.serve.bench import _engine_wave, _make_checkpoint, _prompts
    from dsv.serve.engine import Engine

    ok, why = cpu.availability()
    if not ok:
        raise SystemExit(f"the CPU DSA kernel is not available: {why}")
    tune_cpu_allocator()
    torch.set_num_threads(1)
    rows: list[str] = []
    speedups: list[tuple[str, float]] = []
    with torch.inference_mode():
        for label, name, sizes in _op_cases():
            fn = _op_runner(name, **sizes)
            reps = max(1, int(0.2 / max(1e-4, _time(fn, 1) / 1e3)))  # about 0.2 s a measurement
            res: dict[str, list[float]] = {m: [] for m in MODES}
            for _ in range(args.runs):
                for mode in MODES:
                    _set_mode(mode)
                    res[mode].append(_time(fn, reps))
            med = {m: statistics.median(v) for m, v in res.items()}
            ratio = _paired(res, lower_is_better=True)
            speedups.append((label, ratio))
            rows.append(f"| op: {label} | {med['kernel']:.3f} ms | {med['torch']:.3f} ms | {ratio:.2f}x |")
            print(rows[-1], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _make_checkpoint("tiny", None, Path(tmp) / "tiny")
        model, _ = load_pretrained(str(Path(tmp) / "tiny"), dtype=torch.float32, with_tokenizer=False)
    engine = Engine.for_model(model.eval(), model.config, num_blocks=32 * 42 + 16, max_batch=32)
    engine.start()
    waves: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    try:
        seed = 1000
        for mode in MODES:  # warm-up, both paths
            _set_mode(mode)
            _engine_wave(engine, _prompts(32, 512, cfg.vocab_size, seed := seed + 1), 4)
        for _ in range(args.runs):
            for mode in MODES:
                _set_mode(mode)
                waves[mode].append(
                    _engine_wave(engine, _prompts(32, 512, cfg.vocab_size, seed := seed + 1), 128)
                )
    finally:
        engine.stop()
        os.environ.pop("DSV_KERNELS", None)
    tok = {m: [w["tok_s"] for w in v] for m, v in waves.items()}
    ttft = {m: statistics.median(w["ttft_p50"] for w in v) for m, v in waves.items()}
    ratio = _paired(tok, lower_is_better=False)
    speedups.append(("engine, tiny, 32 x (512 + 128)", ratio))
    rows.append(
        f"| engine: tiny, 32 x (512 + 128), tok/s (TTFT p50) | {statistics.median(tok['kernel']):.0f} "
        f"({ttft['kernel']:.3f} s) | {statistics.median(tok['torch']):.0f} ({ttft['torch']:.3f} s) | {ratio:.2f}x |"
    )
    print(rows[-1], flush=True)

    md = "\n".join([
        f"- command: `OMP_NUM_THREADS=1 python tools/bench/cpu_dsa.py --runs {args.runs}`",
        f"- machine: {host()}; date: {datetime.date.today().isoformat()}; one torch thread; the "
        f"kernel {why}; medians of {args.runs} runs, both paths alternating in one process; speed-up = "
        "median of each run's ratio",
        "",
        "| what | CPU kernel | torch chain | speed-up |",
        "|---|---|---|---|",
        *rows,
        "",
    ])  # fmt: skip
    print(md)
    if args.write is not None:
        atomic_write_bytes(args.write, md.encode())
        plt = pyplot()
        if plt is not None:
            fig, ax = plt.subplots(figsize=(8, 3.4))
            labels = [label for label, _ in speedups]
            ax.barh(labels[::-1], [r for _, r in speedups][::-1], color="#3b7dd8")
            ax.axvline(1.0, color="black", linewidth=0.8)
            ax.set_xlabel("speed-up of the CPU kernel over the torch chain (x)")
            ax.set_title("DSA on a CPU: compiled kernel vs torch ops")
            fig.tight_layout()
            png = args.write.with_suffix(".png")
            save_png(fig, png, dpi=120)
            print(f"wrote {args.write} and {png}")


if __name__ == "__main__":
    main()
