"""``dsv bench core decode``: decode step time and tokens/s vs context, DSA vs dense, run as a user
would (subprocess) on tiny dims; the same command takes ``--device cuda`` on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("dsv.cli")


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dsv.cli.main", "bench", "core", "decode", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )


def test_decode_bench_reports_tokens_per_second_for_a_batch(tmp_path: Path) -> None:
    r = _bench("--preset", "tiny", "--contexts", "64", "--contexts", "128", "--repeats", "1", "--batch", "3",
               "--out", str(tmp_path))  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "core-decode.json").read_text())["rows"]
    assert [row["context"] for row in rows] == [64, 128]
    for row in rows:
        # tokens/s is the batch over the step time, for each attention form
        assert row["dense_tok_s"] == pytest.approx(3 / (row["dense_ms"] / 1e3))
        assert row["dsa_tok_s"] == pytest.approx(3 / (row["dsa_ms"] / 1e3))
    md = (tmp_path / "core-decode.md").read_text()
    assert "batch 3, on cpu" in md and "decode tok/s DSA" in md
    assert (tmp_path / "core-decode.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_decode_bench_refuses_cuda_without_a_gpu_and_unknown_dtypes(tmp_path: Path) -> None:
    for args, needle in ((["--device", "cuda"], "no CUDA device"), (["--dtype", "fp7"], "unknown dtype")):
        r = _bench(*args, "--out", str(tmp_path))
        assert r.returncode == 2 and needle in r.stdout + r.stderr and "Traceback" not in r.stderr


def test_pyplot_is_agg_or_none_without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from dsv.core.plot import pyplot

    pytest.importorskip("matplotlib")
    plt = pyplot()
    assert plt is not None and plt.get_backend().lower() == "agg"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an import of it now fails
    assert pyplot() is None
