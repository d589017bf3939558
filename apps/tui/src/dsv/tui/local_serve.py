"""A local ``dsv serve`` for `dsv chat --serve PATH` (and for a chat started with no endpoint).

`LocalServer(path).start()` runs ``dsv serve PATH --host 127.0.0.1 --port P`` (P a free port) as a
child process in its own process group, waits until ``/health`` answers, and gives the base URL
and the served model name. `stop()` (or leaving the ``with`` block, or interpreter exit) sends
SIGTERM to the group (the server and its engine process), then SIGKILL after a grace period. On
Linux the child also gets ``PR_SET_PDEATHSIG``: if this process is killed outright, the kernel
sends the server SIGTERM, so no server outlives a killed terminal.

With no checkpoint the embedded default is used: a random ``tiny`` model (``dsv model init``'s
preset, seed 0) created on first use in the user's cache folder, so `dsv chat` works out of the box
(its answers are noise: it shows the machinery, not a model). The server's output goes to a log
file (``serve-<port>.log`` in the user's log folder); a failed start quotes its last lines.

Run: ``python -m dsv.tui.local_serve [PATH]`` starts one and prints its URL until Ctrl-C.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dsv.core.errors import DSVError

__all__ = ["LocalServer", "default_model_dir", "ensure_default_model"]

_PR_SET_PDEATHSIG = 1


def default_model_dir() -> Path:
    """Where the embedded default model lives: ``<user cache>/dsv/chat-tiny``."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("dsv")) / "chat-tiny"


def ensure_default_model(folder: Path | None = None) -> Path:
    """The embedded default checkpoint, written on first use with ``dsv model init`` (tiny, seed 0)."""
    folder = folder or default_model_dir()
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    from dsv.core.cli import init

    folder.parent.mkdir(parents=True, exist_ok=True)
    # init writes beside the folder and renames it into place: a second chat starting at the same
    # time sees either no checkpoint or a whole one.
    # Its report goes to stderr: stdout carries only the answer of `dsv chat --print`.
    with contextlib.redirect_stdout(sys.stderr):
        init(out=folder, preset="tiny", config=None, seed=0, dtype="float32", force=True)
    return folder


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _log_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_log_dir("dsv"))


class LocalServer:
    """``dsv serve`` for one checkpoint on a free loopback port (see the module docstring)."""

    def __init__(
        self,
        path: Path | str | None = None,
        *,
        model_name: str | None = None,
        startup_timeout_s: float = 300.0,
        extra_args: list[str] | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.model_name = model_name
        self.startup_timeout_s = startup_timeout_s
        self.extra_args = list(extra_args or [])
        self.log_dir = log_dir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self, checkpoint: Path) -> list[str]:
        """The ``dsv serve`` command line (through this interpreter, so the same installation runs)."""
        cmd = [sys.executable, "-m", "dsv.cli.main", "serve", str(checkpoint), "--host", "127.0.0.1",
               "--port", str(self.port), "--stats-interval", "0"]  # fmt: skip
        if self.model_name:
            cmd += ["--model-name", self.model_name]
        return cmd + self.extra_args

    def start(self) -> LocalServer:
        """Start the server and wait for ``/health``; `DSVError` naming the cause if it does not come up."""
        try:
            from dsv.serve.launch import free_port
        except ImportError:
            raise DSVError(
                "--serve needs dsv-serve, which is not installed: pip install 'dsv-tui[serve]' "
                "(or -e 'apps/tui[serve]' in the dsv repository), or give --endpoint"
            ) from None
        if self.path is None:
            checkpoint = ensure_default_model()
        else:
            checkpoint = self.path
            if not (checkpoint / "config.json").is_file():
                raise DSVError(f"--serve {checkpoint}: not a checkpoint folder (no config.json); give a folder "
                               "written by `dsv model init` or `dsv train`")  # fmt: skip
        self.model_name = self.model_name or checkpoint.resolve().name
        self.port = free_port()
        log_dir = self.log_dir or _log_dir()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"serve-{self.port}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(checkpoint),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        atexit.register(self.stop)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        import httpx

        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://127.0.0.1:{self.port}/health"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DSVError(f"dsv serve exited with code {self.proc.returncode} before it was ready: "
                               f"{self.log_tail()}")  # fmt: skip
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return
            time.sleep(0.1)
        raise DSVError(
            f"dsv serve did not answer /health within {self.startup_timeout_s:g} s (log: {self.log_path})"
        )

    def log_tail(self, lines: int = 3) -> str:
        """The last lines of the server's log, on one line (for error messages)."""
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        tail = " | ".join(line.strip() for line in text[-lines:] if line.strip())
        return f"{tail} (log: {self.log_path})" if tail else f"(empty log: {self.log_path})"

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``grace_s``; idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace_s)
        # The engine process (same group) may outlive the server by a moment, or a stuck one forever.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


if __name__ == "__main__":
    with LocalServer(sys.argv[1] if len(sys.argv) > 1 else None) as server:
        print(f"dsv serve on {server.base_url} (model {server.model_name}); Ctrl-C stops it")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(1)
