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


_PROBE = """
import os, sys
import pytest
import torch

seen = []


class Probe:
    def pytest_runtest_setup(self, item):
        if "test_core_config" in item.nodeid:
            seen.append((os.environ.get("TRITON_INTERPRET"), torch.get_num_threads()))


code = pytest.main(["-p", "no:cacheprovider", "-p", "no:xdist", "-q", *sys.argv[1:]], plugins=[Probe()])
print("PROBE", code, sorted(set(seen)))
"""


def test_kernel_and_serve_settings_end_with_their_tests() -> None:
    # TRITON_INTERPRET (kernel tests) and one torch thread (serve tests) used to stay in force for
    # every later test of the process, and the variable for their subprocesses.
    pytest.importorskip("dsv.kernels")
    pytest.importorskip("dsv.serve")
    order = [
        "kernels/tests/test_kernels_topk.py::test_topk_causal_rows_mark_masked_picks",
        "packages/serve/tests/test_serve_paged_cache.py",
        "packages/core/tests/test_core_config.py",
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, *order],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "OMP_NUM_THREADS": "2"},
    )
    line = next((x for x in r.stdout.splitlines() if x.startswith("PROBE")), None)
    assert line is not None and line.startswith("PROBE 0 "), r.stdout[-3000:] + r.stderr[-2000:]
    assert line == "PROBE 0 [(None, 2)]", line
