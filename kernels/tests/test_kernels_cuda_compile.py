"""The kernels compile for a GPU (sm_90) without one: Triton's compiler and the ptxas in its wheel.

The interpreter runs kernel bodies as Python, so code only the compiler rejects (a reassigned
constexpr, a ``tl.dot`` below 16) passes every other test here. This runs ``dsv.kernels.cuda_compile``
in a subprocess without ``TRITON_INTERPRET`` on the radix top-k at its V3.2 launch configuration (the
full table, every kernel, is in tools/bench/results/kernels.md: about a minute of compiling).

Run: ``pytest kernels/tests/test_kernels_cuda_compile.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton build ships no ptxas")
def test_topk_compiles_for_sm90_within_hardware_limits(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1"}  # a fresh, real compile
    cmd = [sys.executable, "-m", "dsv.kernels.cuda_compile", "--arch", "90", "--only", "topk"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| topk")]
    assert len(rows) == 1, done.stdout
    _, config, shared_kib, regs, spill, _ = (c.strip() for c in rows[0])
    assert "BLOCK=2048" in config and "warps=8" in config
    assert float(shared_kib) <= 227 and int(regs) <= 255 and int(spill) == 0
