"""Two CPU processes under ``accelerate launch`` (gloo, ``configs/accelerate/cpu_2proc.yaml``): each
samples its own prompts on its own engine, gradients are averaged, every process keeps the same
weights, metrics are reduced over both, and the run resumes from its checkpoint to the same steps."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv.core.checkpoint import load_pretrained, read_state_dict

CONFIG = Path(__file__).resolve().parents[3] / "configs" / "accelerate" / "cpu_2proc.yaml"


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith(("seconds", "per_second"))} for r in rows]


def _launch_two(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """``accelerate launch`` of ``dsv.rl`` with two processes on a port of its own (held while the run
    lasts, so no other test is handed it; retried on another when taken anyway)."""
    for _ in range(3):
        with socket.socket() as held:
            held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            held.bind(("127.0.0.1", 0))
            port = str(held.getsockname()[1])
            proc = subprocess.run(
                [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
                 "--main_process_port", port, "-m", "dsv.rl", "grpo", *args],
                env=env, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
        if "address already in use" not in proc.stderr.lower():
            break
    return proc


@pytest.mark.slow
def test_two_processes_train_and_resume(warm_model: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    flags = ["--model", str(warm_model), "--out", str(out), "--tasks", "combinatorics", "--prompts", "2", "-G", "4",
             "--max-tokens", "8", "--top-k", "64", "--temperature", "1.2", "--reward", "verifier",
             "--reward", "length=0.5", "--lr", "1e-3", "--save-every", "2", "--no-progress"]  # fmt: skip
    proc = _launch_two(env, *flags, "--steps", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # 2 processes x 2 prompts x G=4 samples per step, reduced into one record.
    assert all(r["rollout_tokens"] >= 16 for r in rows)
    assert any(r["grad_norm"] > 0 for r in rows)
    first = read_state_dict(out / "final")
    # Both processes restart from checkpoint-0000002 (each its own RNG) and redo steps 3-4 identically.
    proc = _launch_two(env, *flags, "--steps", "4", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Same rollouts and updates; one process (test_rl_resume.py) is bit-exact, two are held to float
    # noise (seen once under a loaded machine: ~1e-9 differences in terms that are ~1e-9 themselves).
    again_rows = _metrics(out)
    assert [r.keys() for r in again_rows] == [r.keys() for r in rows]
    for r, a in zip(rows, again_rows, strict=True):
        assert a == pytest.approx(r, rel=1e-4, abs=1e-6), r["step"]
    again = read_state_dict(out / "final")
    assert all(torch.allclose(first[k].float(), again[k].float(), rtol=1e-4, atol=1e-6) for k in first)
    model, tok = load_pretrained(out / "final")
    assert tok is not None
    state = json.loads((out / "final" / "train_state" / "state.json").read_text())
    assert state["world"] == 2 and (out / "final" / "train_state" / "rng-1.pt").exists()
