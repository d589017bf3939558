"""--resume on damaged run folders: a truncated optimizer.pt or weight file falls back to the
checkpoint before it, staging folders of a killed save are removed, and a run with nothing to
continue from says so instead of restarting silently.

Run: ``pytest packages/train/tests/test_train_resume_faults.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv.train import TrainConfig, train
from dsv.train.trainer import list_checkpoints, pick_resume_checkpoint, remove_unfinished_saves

SMALL = {
    "seq_len": 32,
    "micro_batch_size": 2,
    "default_data_size": 80,
    "progress": False,
    "tensorboard": False,
    "keep_last": 0,
}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def run4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run with checkpoints after steps 1, 2 and 3 (the last step is final/)."""
    out = tmp_path_factory.mktemp("resume") / "run"
    train(TrainConfig(stage="pretrain", out=out, steps=4, save_every=1, **SMALL))
    return out


def _copy(run: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(run, dest)
    shutil.rmtree(dest / "final")
    return dest


def test_truncated_optimizer_state_falls_back_to_the_previous_checkpoint(
    run4: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = _copy(run4, tmp_path / "run")
    newest = list_checkpoints(run)[-1]
    assert newest.name == "checkpoint-0000003"
    _truncate(newest / "train_state" / "optimizer.pt")
    summary = train(TrainConfig(stage="pretrain", out=run, steps=4, save_every=1, resume=True, **SMALL))
    said = capsys.readouterr().out
    assert "skipping checkpoint-0000003" in said
    assert f"resuming from {run / 'checkpoint-0000002'} (step 2 of 4)" in said
    assert summary.steps == 4
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_truncated_weights_are_skipped_too(run4: Path, tmp_path: Path) -> None:
    run = _copy(run4, tmp_path / "run")
    ckpts = list_checkpoints(run)
    _truncate(next(ckpts[-1].glob("*.safetensors")))
    said: list[str] = []
    picked = pick_resume_checkpoint(ckpts, sharded=False, log=said.append)
    assert picked is not None and picked[0] == ckpts[-2] and picked[1]["step"] == 2
    assert len(said) == 1 and "truncated" in said[0]
    for c in ckpts:
        (c / "train_state" / "rng.pt").unlink()
    assert pick_resume_checkpoint(ckpts, sharded=False, log=said.append) is None
    assert len(said) == 4


def test_staging_folders_of_a_killed_save_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / ".checkpoint-0000002.ab12cd.tmp" / "train_state").mkdir(parents=True)
    (out / ".final.xy.tmp").mkdir()
    (out / "checkpoint-notes").mkdir()  # not a staging folder: kept
    removed = remove_unfinished_saves(out)
    assert sorted(p.name for p in removed) == [".checkpoint-0000002.ab12cd.tmp", ".final.xy.tmp"]
    assert [p.name for p in out.iterdir()] == ["checkpoint-notes"]


def test_resume_with_nothing_to_resume_says_it_starts_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    # what a run killed during its first save leaves: a staging folder and no checkpoint
    (out / ".checkpoint-0000001.k1.tmp").mkdir(parents=True)
    summary = train(TrainConfig(stage="pretrain", out=out, steps=1, save_every=0, resume=True, **SMALL))
    said = capsys.readouterr().out
    assert "removed 1 unfinished checkpoint folder(s)" in said
    assert "has nothing to continue from (it holds no complete checkpoint); starting at step 0" in said
    assert summary.steps == 1 and not (out / ".checkpoint-0000001.k1.tmp").exists()
