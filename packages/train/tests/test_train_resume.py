"""Checkpoint/resume: SIGKILL mid-run then --resume gives the uninterrupted loss curve; a changed
setting is refused; a save that fails midway leaves the previous checkpoint loadable.

Run: ``pytest packages/train/tests/test_train_resume.py``.
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

from dsv.core.checkpoint import load_pretrained
from dsv.train import TrainConfig, TrainError, train
from dsv.train.trainer import list_checkpoints

SMALL = {
    "seq_len": 48,
    "micro_batch_size": 2,
    "default_data_size": 160,
    "progress": False,
    "tensorboard": False,
}
FLAGS = ["--seq-len", "48", "--micro-batch-size", "2", "--default-data-size", "160", "--no-progress",
         "--steps", "24", "--save-every", "2", "--model", "tiny"]  # fmt: skip


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dsv.train", "pretrain", "--out", str(out), *FLAGS, *extra]


@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_loss_curve(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_cmd(ref), check=True, env=env, capture_output=True, timeout=600)

    # Killed once the first checkpoint (step 2) is behind it, with 20 steps to go: however slowly this
    # process notices, the run is still going; if a stalled host let it finish anyway, kill a new one.
    for attempt in range(3):
        run = tmp_path / f"run{attempt}"
        proc = subprocess.Popen(_cmd(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        metrics = run / "metrics.jsonl"
        deadline = time.monotonic() + 600
        while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline, "no third step within 10 minutes"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if not (run / "final").exists():
            break
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "final").exists(), "the run finished before it was killed, three times"
    assert list_checkpoints(run), "no checkpoint was written before the kill"

    subprocess.run(_cmd(run, "--resume"), check=True, env=env, capture_output=True, timeout=600)
    assert _losses(run) == _losses(ref)
    assert len(_losses(ref)) == 24


def test_resume_refuses_changed_settings_and_missing_flag(tmp_path: Path) -> None:
    train(TrainConfig(stage="pretrain", out=tmp_path, steps=2, save_every=1, **SMALL))
    with pytest.raises(TrainError, match=r"--resume refused: .*lr \(checkpoint 0\.001, now 0\.01\)"):
        train(
            TrainConfig(stage="pretrain", out=tmp_path, steps=2, save_every=1, lr=0.01, resume=True, **SMALL)
        )
    with pytest.raises(TrainError, match="pass --resume"):
        train(TrainConfig(stage="pretrain", out=tmp_path, steps=2, save_every=1, **SMALL))


def test_failed_save_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dsv.core.checkpoint as ckpt

    real = ckpt.write_weights
    calls = {"n": 0}

    def failing(folder: Path, state: dict, **kw: object) -> None:  # type: ignore[type-arg]
        calls["n"] += 1
        if calls["n"] == 2:  # the second save dies after writing part of its files (disk full)
            (Path(folder) / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 100)
            raise OSError(28, "No space left on device")
        real(folder, state, **kw)

    monkeypatch.setattr(ckpt, "write_weights", failing)
    with pytest.raises(OSError, match="No space left"):
        train(TrainConfig(stage="pretrain", out=tmp_path, steps=4, save_every=2, **SMALL))
    good = list_checkpoints(tmp_path)
    assert [p.name for p in good] == ["checkpoint-0000002"]
    assert not (tmp_path / "final").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], (
        "a temporary folder was left behind"
    )
    model, tok = load_pretrained(good[0])
    assert tok is not None and model is not None

    monkeypatch.setattr(ckpt, "write_weights", real)
    summary = train(TrainConfig(stage="pretrain", out=tmp_path, steps=4, save_every=2, resume=True, **SMALL))
    assert summary.steps == 4 and (tmp_path / "final" / "config.json").exists()
    assert [s for s, _ in _losses(tmp_path)] == [1, 2, 3, 4]
