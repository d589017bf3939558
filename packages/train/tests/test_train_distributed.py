"""Two CPU processes under ``accelerate launch`` (gloo) give the loss of one process with the same global
batch. The launch uses the shipped ``configs/accelerate/cpu_2proc.yaml`` (torchrun-spawned processes; the
trainer joins them on the CPU with gloo when CUDA is absent).

Run: ``pytest packages/train/tests/test_train_distributed.py``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

FLAGS = ["--seq-len", "48", "--default-data-size", "160", "--no-progress", "--steps", "3", "--save-every", "0",
         "--model", "tiny"]  # fmt: skip


CONFIG = Path(__file__).resolve().parents[3] / "configs" / "accelerate" / "cpu_2proc.yaml"


def _losses(out: Path) -> list[float]:
    return [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def _launch_two(out: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``accelerate launch`` (this interpreter's) of the two-process run on a port of its own.

    The port is held (address reuse, never listening) while the run lasts, so no other test is handed
    it, and the rendezvous store, which binds with address reuse, can still listen on it. A port taken
    anyway (by something outside this suite) is retried on another."""
    for _ in range(3):
        with socket.socket() as held:
            held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            held.bind(("127.0.0.1", 0))
            port = str(held.getsockname()[1])
            proc = subprocess.run(
                [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
                 "--main_process_port", port, "-m", "dsv.train", "pretrain", "--out", str(out),
                 "--micro-batch-size", "2", *FLAGS],
                env=env, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
        if "address already in use" not in proc.stderr.lower():
            break
    return proc


@pytest.mark.slow
def test_two_processes_match_one(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "dsv.train", "pretrain", "--out", str(one), "--micro-batch-size", "4", *FLAGS],
                   check=True, env=env, capture_output=True, timeout=600)  # fmt: skip
    two = tmp_path / "two"
    proc = _launch_two(two, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        json.loads((two / "summary.json").read_text())["tokens"]
        == json.loads((one / "summary.json").read_text())["tokens"]
    )
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 3
    assert b == pytest.approx(a, rel=1e-4)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["val_loss"] == pytest.approx(
        json.loads((one / "summary.json").read_text())["val_loss"], rel=1e-4
    )
