"""``dsv bench serve``'s plot: one PNG with tokens/s and TTFT against clients per preset and shape.

The benchmark itself takes minutes (it runs transformers beside dsv); its pieces are tested where
they live (the load generator in test_serve_loadgen.py). Run: ``pytest packages/serve/tests/test_serve_bench.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dsv.serve.bench import plot_serve


def _row(preset: str, clients: int, engine: bool) -> dict[str, Any]:
    side = {"tok_s": 100.0 * clients, "ttft_p50": 0.01 * clients, "ttft_p99": 0.02 * clients}
    return {"preset": preset, "layers": 2, "shape": "512+128", "clients": clients, "dsv": side,
            "engine": side if engine else {}, "hf": {**side, "tok_s": 20.0 * clients}}  # fmt: skip


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
