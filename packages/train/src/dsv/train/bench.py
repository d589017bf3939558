"""``dsv bench train``: training tokens/s of every stage of the recipe on one preset.

Each stage runs for ``--steps`` steps on the embedded corpus (pretrain dense from fresh weights,
then DSA warm-up and sparse training from it, as ``dsv train`` runs them; tokens/s as the trainer
reports it) and the results go to ``OUT/train-stages.{json,md}``. The model-level
comparison with a plain torch loop is ``tools/bench/train_throughput.py``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer
from rich.console import Console

console = Console()


def bench_train(
    preset: str = typer.Option("tiny", help="Model preset (fresh weights)."),
    steps: int = typer.Option(20, min=2, help="Steps per stage."),
    micro_batch_size: int = typer.Option(8, min=1, help="Rows per step."),
    seq_len: int = typer.Option(128, min=2, help="Tokens per row."),
    out: Path = typer.Option(Path("bench-out"), help="Folder for the JSON/Markdown results."),
) -> None:
    """Tokens/s of pretrain (dense), dsa-warmup and dsa-sparse on the embedded corpus."""
    from dsv.core.bench import machine
    from dsv.core.checkpoint import atomic_write_bytes, atomic_write_json
    from dsv.train import TrainConfig, train

    rows = []
    with tempfile.TemporaryDirectory(prefix="dsv-bench-train-") as tmp:
        model = preset
        for stage in ("pretrain", "dsa-warmup", "dsa-sparse"):
            cfg = TrainConfig(stage=stage, model=model, out=Path(tmp) / stage, steps=steps, seq_len=seq_len,
                              micro_batch_size=micro_batch_size, attention="dense" if stage == "pretrain" else "auto",
                              save_every=0, progress=False, tensorboard=False, plot=False)  # fmt: skip
            s = train(cfg)
            rows.append({"stage": stage, "steps": s.steps, "tokens": s.tokens, "seconds": s.seconds,
                         "tokens_per_second": s.tokens_per_second})  # fmt: skip
            console.print(f"{stage:>10}: {s.tokens_per_second:,.0f} tokens/s ({s.steps} steps, {s.seconds:.1f}s)")
            model = s.final_dir
    md = [
        f"Training throughput, preset `{preset}`, {micro_batch_size} x {seq_len} tokens per step, {steps} steps "
        f"per stage, on {machine()}.", "",
        "| stage | tokens/s | seconds |", "|---|---|---|",
        *[f"| {r['stage']} | {r['tokens_per_second']:,.0f} | {r['seconds']:.1f} |" for r in rows], "",
    ]  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "train-stages.json", {"machine": machine(), "rows": rows})
    atomic_write_bytes(out / "train-stages.md", "\n".join(md).encode())
    console.print(f"results: {out / 'train-stages.md'}")
