"""tools/gpu_check.sh does not rot: its ``--dry-run`` runs every step of the GPU check on the CPU (tiny
shapes, Triton's interpreter) and each step leaves its table behind; bad arguments and a machine
without a GPU get one ``error:`` line and exit 2.

Run: ``pytest tests/test_gpu_check.py``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_check.sh"
STEPS = (
    "kernel-tests",
    "compile-check",
    "bench-kernels",
    "bench-fp8-gemm",
    "bench-core-decode",
    "bench-serve",
)


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("DSV_KERNELS_TEST_DEVICE", None)
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


@pytest.mark.slow  # about a minute: six steps, each a fresh Python process
def test_dry_run_runs_every_step_and_writes_the_tables(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    done = _run("--dry-run", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (out / "summary.md").read_text()
    for step in STEPS:
        assert f"| {step} | passed | " in summary, summary
        assert (out / "logs" / f"{step}.log").stat().st_size > 0
    # the act-quant (4) and GEMM (2) tests under the interpreter: a selection that matched nothing fails here
    assert re.search(r"\b6 passed\b", (out / "logs" / "kernel-tests.log").read_text())
    assert re.search(r"\b1 passed\b", (out / "logs" / "compile-check.log").read_text())  # the mma classifier
    # the native CUDA pass names every kernel test file but the compile check (its own step)
    listed = re.search(r"^- kernel test files \(native CUDA pass\): (.*)$", summary, re.M)
    assert listed, summary
    expected = {f"kernels/tests/{p.name}" for p in (ROOT / "kernels" / "tests").glob("test_kernels_*.py")}
    expected = expected - {"kernels/tests/test_kernels_cuda_compile.py"} | {"kernels/tests/test_dsa_ties.py"}
    assert set(listed.group(1).split()) == expected
    kernels = json.loads((out / "kernels" / "kernels_bench.json").read_text())
    assert {r["op"] for r in kernels["records"]} == {"indexer", "topk", "sparse_prefill", "sparse_decode"}
    assert all(r["impl"] == "triton" and r["check"] == "pass" for r in kernels["records"])
    assert "| tiny | 32 | 1 | 32 | sparse_prefill | triton |" in summary
    fp8 = json.loads((out / "fp8-gemm" / "fp8_gemm_bench.json").read_text())
    assert {(r["layer"], r["M"]) for r in fp8["records"]} == {
        ("o_proj", 1), ("o_proj", 16), ("expert down", 1), ("expert down", 16),
    }  # fmt: skip
    assert "| expert down | 16 | " in summary
    assert (out / "core-decode" / "core-decode.md").read_text().strip()
    assert (out / "serve" / "serve.md").read_text().strip()
    for table in ("kernels/kernels_bench.md", "fp8-gemm/fp8_gemm_bench.md", "core-decode/core-decode.md",
                  "serve/serve.md"):  # fmt: skip
        assert f"\n## {table}\n" in summary  # every table gathered into the summary


def test_bad_arguments_and_no_gpu_fail_in_one_line(tmp_path: Path) -> None:
    done = _run("--bogus")
    assert done.returncode == 2 and done.stderr.strip() == (
        "error: unknown argument '--bogus' (use --dry-run, --out DIR or --help)"
    )
    done = _run("--out")
    assert done.returncode == 2 and done.stderr.strip() == "error: --out needs a folder"
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the real run is not refused here")
    done = _run("--out", str(tmp_path / "x"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: torch sees no CUDA device here; run with --dry-run to check the script on a CPU"
    ]
    assert not (tmp_path / "x" / "summary.md").exists()
