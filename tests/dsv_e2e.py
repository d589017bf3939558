"""Helpers of the cross-package tests: run the real `dsv` command as a user would, hold a free port.

A module of its own (not conftest.py) so test modules can import it by name: pytest puts this folder
on sys.path (import mode "prepend", see the root pyproject.toml).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

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


@contextlib.contextmanager
def reserved_port() -> Iterator[int]:
    """A loopback port held while the block runs, for a server started in a subprocess.

    It stays bound (address reuse on, never listening), so no other test is handed it, while the
    server, which binds with address reuse as uvicorn does, can listen on it. A port found free and
    let go, then bound again by the server, can be taken in between by a test running beside this one."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])
