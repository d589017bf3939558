"""Resume: a GRPO run killed with SIGKILL after a checkpoint and resumed gives the metrics and the
final weights of an uninterrupted run; a changed setting or a missing --resume is refused.

Run: ``pytest packages/rl/tests/test_rl_resume.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dsv.core.checkpoint import read_state_dict
from dsv.train.trainer import list_checkpoints

# Timings differ between runs; everything else must not.
_TIMING = ("seconds", "per_second")


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith(_TIMING)} for r in rows]


def _cmd(model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dsv.rl", "grpo", "--model", str(model), "--out", str(out), "--tasks", "combinatorics",
            "--steps", "12", "--save-every", "2", "--prompts", "2", "--group-size", "4", "--max-tokens", "8",
            "--top-k", "64", "--temperature", "1.2", "--beta", "0.02", "--lr", "1e-3", "--reward", "verifier", "--reward", "length=0.5",
            "--no-progress", *extra]  # fmt: skip


@pytest.mark.slow
def test_sigkill_then_resume_continues_identically(warm_model: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_cmd(warm_model, ref), check=True, env=env, capture_output=True, timeout=600)

    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(warm_model, run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not list_checkpoints(run):
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "final").exists(), "the run finished before it was killed"
    assert list_checkpoints(run), "no checkpoint was written before the kill"

    subprocess.run(_cmd(warm_model, run, "--resume"), check=True, env=env, capture_output=True, timeout=600)
    got, want = _metrics(run), _metrics(ref)
    assert [m["step"] for m in want] == list(range(1, 13))
    assert got == want
    a, b = read_state_dict(run / "final"), read_state_dict(ref / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(m["loss/kl_ref"] > 0 for m in want[1:]), "the KL term never moved: the test checks too little"


def test_resume_refuses_changed_settings_and_a_missing_flag(warm_model: Path, tmp_path: Path) -> None:
    from dsv.rl import GRPOConfig, RLError, grpo

    base = {"model": str(warm_model), "out": tmp_path, "tasks": ["combinatorics"], "steps": 2, "prompts": 1,
            "group_size": 2, "max_tokens": 4, "save_every": 1, "progress": False, "tensorboard": False, "plot": False}  # fmt: skip
    grpo(GRPOConfig(**base))
    with pytest.raises(RLError, match=r"--resume refused: .*group_size \(checkpoint 2, now 3\)"):
        grpo(GRPOConfig(**{**base, "group_size": 3, "resume": True}))
    with pytest.raises(RLError, match="pass --resume"):
        grpo(GRPOConfig(**base))
