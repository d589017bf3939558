"""`dsv bench synth`: tasks generated and verified per second, per family, beside reasoning_gym.

For each family: generate N tasks (seeds 0..N-1, default difficulty), solve, verify;
throughput = N / seconds, median of `--repeats` runs. Comparable reasoning_gym
datasets (basic_arithmetic, zebra_puzzles, sudoku, knights_knaves, shortest_path)
are timed the same way in the same run (create_dataset + score_answer of the
reference answer) and reported as a ratio dsv/reasoning_gym.

    dsv bench synth --n 50 --repeats 3 --out tools/bench/results/synth.md
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import time
from pathlib import Path

import typer

__all__ = ["COMPARABLE", "bench", "measure_family", "measure_reasoning_gym"]

COMPARABLE = {
    "arithmetic": "basic_arithmetic",
    "zebra": "zebra_puzzles",
    "sudoku": "sudoku",
    "knights_knaves": "knights_knaves",
    "shortest_path": "shortest_path",
}


def measure_family(name: str, n: int) -> float:
    """Tasks generated + solved + verified per second for one dsv family (one run)."""
    from dsv.synth import registry, safe_verify

    env = registry.get(name)
    t0 = time.perf_counter()
    for seed in range(n):
        task = env.generate(seed)
        assert safe_verify(env, task, env.solve(task)).passed, f"{task.id}: reference rejected"
    return n / (time.perf_counter() - t0)


def measure_reasoning_gym(dataset: str, n: int) -> float | None:
    """Entries generated + scored per second for one reasoning_gym dataset (None if not installed)."""
    try:
        import reasoning_gym
    except ImportError:
        return None
    t0 = time.perf_counter()
    data = reasoning_gym.create_dataset(dataset, seed=0, size=n)
    for entry in data:  # generation is lazy: items are built on access
        data.score_answer(entry["answer"], entry)
    return n / (time.perf_counter() - t0)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def bench(
    n: int = typer.Option(50, "--n", min=1, help="tasks per family per run"),
    repeats: int = typer.Option(3, "--repeats", min=1, help="runs per family (median reported)"),
    families: list[str] = typer.Option([], "--family", help="only these families (default: all)"),
    out: Path = typer.Option(Path("tools/bench/results/synth.md"), "--out", help="Markdown results file"),
) -> None:
    """Throughput of task generation + verification per family, with reasoning_gym ratios."""
    from rich.console import Console
    from rich.table import Table

    from dsv.synth import registry

    console = Console()
    names = families or [n_ for n_ in registry.families() if n_ != "code_repair"] + ["code_repair"]
    rows: list[tuple[str, float, str, float | None]] = []
    for name in names:
        ours = statistics.median(measure_family(name, n) for _ in range(repeats))
        rg_name = COMPARABLE.get(name, "")
        theirs = (
            statistics.median(measure_reasoning_gym(rg_name, n) or 0.0 for _ in range(repeats))
            if rg_name
            else None
        )
        rows.append((name, ours, rg_name, theirs or None))
        console.print(f"{name}: {ours:.1f} tasks/s" + (f" | rg:{rg_name} {theirs:.1f}/s" if theirs else ""))
    table = Table(title="dsv synth: generate + solve + verify")
    for col in ("family", "dsv tasks/s", "reasoning_gym dataset", "rg tasks/s", "ratio dsv/rg"):
        table.add_column(col)
    lines = [
        "## dsv-synth: task generation + verification throughput",
        "",
        f"Command: `dsv bench synth --n {n} --repeats {repeats}`  ",
        f"Machine: 2-core CPU, no GPU ({platform.processor() or platform.machine()}, Python "
        f"{platform.python_version()}); date {_dt.date.today().isoformat()}.  ",
        f"Each number is the median of {repeats} runs of {n} tasks at the default difficulty (2): generate, "
        f"run the reference solver, verify. reasoning_gym: create_dataset + score_answer of its reference "
        f"answer, same run, same machine. `code_repair` verification runs hidden tests in the sandbox "
        f"(one subprocess per task).",
        "",
        "| family | dsv tasks/s | reasoning_gym dataset | rg tasks/s | ratio dsv/rg |",
        "|---|---:|---|---:|---:|",
    ]
    for name, ours, rg_name, theirs in rows:
        ratio = f"{ours / theirs:.2f}" if theirs else "-"
        rg_s = f"{theirs:.1f}" if theirs else "-"
        table.add_row(name, f"{ours:.1f}", rg_name or "-", rg_s, ratio)
        lines.append(f"| {name} | {ours:.1f} | {rg_name or '-'} | {rg_s} | {ratio} |")
    lines += [
        "",
        "Difficulty is not matched between the two libraries (each uses its default), so ratios compare "
        "default-configuration throughput, not equal puzzle hardness. dsv verifiers check constraints "
        "(e.g. sudoku rows/columns/boxes, knights-and-knaves statement consistency) rather than string equality.",
        "",
    ]
    console.print(table)
    _atomic_write(out, "\n".join(lines))
    console.print(f"results written to {out}")
