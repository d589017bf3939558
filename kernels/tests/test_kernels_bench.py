"""``dsv bench kernels`` runs end to end (torch path on CPU at a tiny size) and rejects bad flags.

Run: ``pytest kernels/tests/test_kernels_bench.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dsv.kernels.bench import BenchShape, run_benchmarks


def test_run_benchmarks_records_every_op_with_dense_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    # scores budget for 16 of the 48 queries: the long-context path (last queries only) runs
    monkeypatch.setattr("dsv.kernels.bench.SCORE_BYTES", 4 * 2 * 48 * 16)
    shape = BenchShape.from_preset("tiny")
    records = run_benchmarks(
        shapes=[shape], contexts=[48], batch=2, device="cpu", backend="torch", repeats=1, dtype_name="fp32"
    )
    assert {r["op"] for r in records} == {
        "indexer",
        "topk",
        "sparse_prefill",
        "dense_prefill",
        "sparse_decode",
        "dense_decode",
    }
    assert all(r["ms"] > 0 for r in records)
    assert {r["op"]: r["queries"] for r in records if r["op"] in ("indexer", "topk")} == {
        "indexer": 16,
        "topk": 16,
    }
    assert all(r["queries"] == 48 for r in records if r["op"] not in ("indexer", "topk"))
    sparse = next(r for r in records if r["op"] == "sparse_prefill")
    dense = next(r for r in records if r["op"] == "dense_prefill")
    assert sparse["speedup_vs_dense"] == pytest.approx(dense["ms"] / sparse["ms"])


def test_bench_cli_writes_json_and_png(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "from dsv.cli.main import main; main()", "bench", "kernels", "--device", "cpu",
           "--preset", "tiny", "--contexts", "32", "--repeats", "1", "--dtype", "fp32", "--out", str(tmp_path)]  # fmt: skip
    pytest.importorskip("dsv.cli.main")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "kernels_bench.json").read_text())
    assert data["meta"]["device"] == "cpu" and len(data["records"]) == 6
    assert (tmp_path / "kernels_bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_bad_flags_fail_in_one_line() -> None:
    # in-process (the CLI path itself is covered above): flags are checked before torch is imported
    import typer
    from typer.testing import CliRunner

    from dsv.kernels.bench import bench_app

    app = typer.Typer()
    app.command()(bench_app)
    for flags, message in (
        (["--device", "gpu"], "error: --device must be auto, cpu or cuda, got 'gpu'"),
        (["--ops", "sparse_prefill,flash"], "error: unknown --ops flash; choose from indexer, topk, "
         "sparse_prefill, dense_prefill, sparse_decode, dense_decode"),
        (["--contexts", "4k"], "error: --contexts must be comma-separated integers, got '4k'"),
    ):  # fmt: skip
        done = CliRunner().invoke(app, flags)
        assert done.exit_code == 2 and done.stderr.strip() == message, (flags, done.output)
