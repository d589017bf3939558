"""``dsv bench serve``: its plot (one PNG with tokens/s and TTFT against clients per preset and
shape) and the smallest end-to-end run of the command.

A full benchmark takes minutes (it runs transformers beside dsv); its pieces are also tested where
they live (the load generator in test_serve_loadgen.py). Run: ``pytest packages/serve/tests/test_serve_bench.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from dsv.serve.bench import plot_serve


def _row(preset: str, clients: int, engine: bool) -> dict[str, Any]:
    side = {"tok_s": 100.0 * clients, "ttft_p50": 0.01 * clients, "ttft_p99": 0.02 * clients}
    return {"preset": preset, "layers": 2, "shape": "512+128", "clients": clients, "dsv": side,
            "engine": side if engine else {}, "hf": {**side, "tok_s": 20.0 * clients}, "ratio": 5.0,
            "paired": 4.98}  # fmt: skip


def test_console_table_fits_80_columns() -> None:
    from rich.console import Console

    from dsv.serve.bench import compact_table

    # The widest cells a run can give: small preset, long shape, three-digit clients, 5-digit tokens/s.
    rows = [_row("small", 128, engine=True), _row("tiny", 1, engine=False)]
    rows[0]["shape"], rows[0]["dsv"] = "4096+1024", {"tok_s": 12345.6, "ttft_p50": 12.5, "ttft_p99": 20.0}
    console = Console(width=80, record=True, color_system=None)
    console.print(compact_table(rows))
    text = console.export_text()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80, text
    for cell in ("small 2L", "4096+1024", "128", "12346", "5.00x", "4.98x", "12.50", "-"):
        assert cell in text, cell


def test_plot_has_a_column_per_preset_and_shape(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from PIL import Image

    rows = [_row("tiny", c, engine=True) for c in (1, 8, 32)] + [
        _row("small", c, engine=False) for c in (1, 8, 32)
    ]
    one = tmp_path / "one.png"
    assert plot_serve(rows[:3], one)
    two = tmp_path / "two.png"
    assert plot_serve(rows, two)
    assert two.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    w1, h1 = Image.open(one).size
    w2, h2 = Image.open(two).size
    assert h1 == h2 and w2 > 1.8 * w1, "a second (preset, shape) adds a column"
    assert {p.name for p in tmp_path.iterdir()} == {"one.png", "two.png"}, "no temporary file left behind"


@pytest.mark.slow
def test_the_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    # The smallest real run (about 25 s): a served tiny checkpoint, the load generator, the
    # in-process engine and transformers, one cell; the Markdown section and its plot are written.
    import subprocess

    out = tmp_path / "serve.md"
    # This environment's own command, never whichever `dsv` comes first on PATH.
    cmd = [sys.executable, "-m", "dsv.cli.main", "bench", "serve", "--preset", "tiny", "--clients", "2",
           "--shape", "16x4", "--runs", "1"]  # fmt: skip
    done = subprocess.run([*cmd, "--write", str(out), "--json"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    # --json: stdout is the JSON document alone (progress and notes on stderr)
    doc = json.loads(done.stdout)
    [row] = doc["rows"]
    assert (row["preset"], row["shape"], row["clients"], doc["runs"]) == ("tiny", "16+4", 2, 1)
    assert row["ratio"] == pytest.approx(row["dsv"]["tok_s"] / row["hf"]["tok_s"]) and row["engine"]["tok_s"] > 0
    md = out.read_text()
    assert "| tiny (2 layers) | 16+4 | 2 |" in md and "float32 on cpu" in md
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run([*cmd, "--device", "tpu"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown device" in bad.stderr and "Traceback" not in bad.stderr
