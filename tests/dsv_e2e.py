"""Helpers of the cross-package tests: run the real `dsv` command as a user would, find a free port.

A module of its own (not conftest.py) so test modules can import it by name: pytest puts this folder
on sys.path (import mode "prepend", see the root pyproject.toml).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest


def run_dsv(
    *args: str, timeout: float = 600, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `dsv ARGS...` as a user would; fail the test with its output when it fails unexpectedly."""
    r = subprocess.run(
        [sys.executable, "-m", "dsv.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    if check and r.returncode != 0:
        pytest.fail(
            f"dsv {' '.join(args)} exited {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
        )
    return r


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
