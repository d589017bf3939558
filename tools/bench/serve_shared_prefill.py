"""Prefill sharing in the serve engine: identical prompt prefixes arriving together, prefilled once
(``Engine(share_prefill=True)``, the default) against every copy prefilled on its own
(``share_prefill=False``), in the same process, alternating, on the tiny preset.

Two workloads of 32 sequences with 32 output tokens each, greedy, one torch thread:

- ``n4``: 8 requests of 512 distinct tokens, each asking for n = 4 choices (the HTTP layer submits
  one sequence per choice);
- ``system``: 32 users sharing one 448-token system prompt, each with its own 64-token question.

Every run uses fresh random prompts (nothing is left in the prefix cache from an earlier run).
Prints a Markdown table (medians of ``--runs``); ``--write F`` also writes it to F::

    OMP_NUM_THREADS=1 python tools/bench/serve_shared_prefill.py --runs 5
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch


def _prompts(kind: str, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    if kind == "n4":
        base = torch.randint(16, 1000, (8, 512), generator=g).tolist()
        return [p for p in base for _ in range(4)]
    system = torch.randint(16, 1000, (448,), generator=g).tolist()
    return [system + torch.randint(16, 1000, (64,), generator=g).tolist() for _ in range(32)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()

    from dsv.core.allocator import tune_cpu_allocator
    from dsv.core.bench import host
    from dsv.core.checkpoint import atomic_write_bytes, load_pretrained
    from dsv.serve.bench import _engine_wave, _make_checkpoint
    from dsv.serve.engine import Engine

    tune_cpu_allocator()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        _make_checkpoint("tiny", None, Path(tmp) / "tiny")
        model, _ = load_pretrained(str(Path(tmp) / "tiny"), dtype=torch.float32, with_tokenizer=False)
    model.eval()
    engines = {}
    for share in (True, False):
        engine = Engine.for_model(model, model.config, num_blocks=2048, max_batch=32, share_prefill=share)
        engine.start()
        _engine_wave(engine, _prompts("n4", 1), 2)  # warm-up
        engines[share] = engine
    seed = 1000
    rows: list[str] = []
    try:
        for kind in ("n4", "system"):
            res: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
            for _ in range(args.runs):
                for share, engine in engines.items():
                    seed += 1
                    res[share].append(_engine_wave(engine, _prompts(kind, seed), 32))
            med = {k: {m: statistics.median(r[m] for r in v) for m in ("tok_s", "ttft_p50", "ttft_p99")}
                   for k, v in res.items()}  # fmt: skip
            paired = statistics.median(
                a["tok_s"] / b["tok_s"] for a, b in zip(res[True], res[False], strict=True)
            )
            on, off = med[True], med[False]
            rows.append(f"| {kind} | {on['tok_s']:.0f} | {off['tok_s']:.0f} | {on['tok_s'] / off['tok_s']:.2f}x "
                        f"({paired:.2f}x paired) | {on['ttft_p50']:.3f} / {on['ttft_p99']:.3f} | "
                        f"{off['ttft_p50']:.3f} / {off['ttft_p99']:.3f} |")  # fmt: skip
    finally:
        for engine in engines.values():
            engine.stop()
    md = "\n".join([
        "- command: `OMP_NUM_THREADS=1 python tools/bench/serve_shared_prefill.py "
        f"--runs {args.runs}`",
        f"- machine: {host()}; date: {datetime.date.today().isoformat()}; tiny preset, in-process "
        f"engine, one torch thread, 32 sequences x 32 output tokens, median of {args.runs} runs, both "
        "settings alternating in one process",
        "",
        "| workload | tok/s shared | tok/s not shared | ratio | TTFT p50 / p99 shared (s) | "
        "TTFT p50 / p99 not shared (s) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ])  # fmt: skip
    print(md)
    if args.write is not None:
        atomic_write_bytes(args.write, md.encode())


if __name__ == "__main__":
    main()
