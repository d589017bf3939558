"""The suite passes in any order: test modules must never shadow an installed top-level package.

Under pytest's importlib import mode, a test under the top-level ``kernels/`` folder registered a
placeholder ``kernels`` module, and transformers (which imports Hugging Face's ``kernels`` package when a
model loads) then failed in every later test of that process. This runs the order that used to fail, in
a fresh pytest process with the repository's own configuration.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_parity_tests_pass_after_kernel_tests_in_one_process() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("dsv.kernels")
    order = ["kernels/tests/test_kernels_topk.py", "packages/core/tests/test_core_parity.py"]
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q", *order],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    tail = r.stdout[-3000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    summary = r.stdout.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and "error" not in summary and "skipped" not in summary, summary
