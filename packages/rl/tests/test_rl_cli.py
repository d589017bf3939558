"""`dsv rl grpo` through the real `dsv` console script: a short run end to end, and every bad input
as a one-line error with a nonzero exit code (no traceback)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsv.core.checkpoint import load_pretrained
from dsv.train.trainer import list_checkpoints

BASE = ["--tasks", "combinatorics", "--prompts", "2", "--group-size", "4", "--max-tokens", "8", "--no-progress"]


def _dsv() -> str:
    exe = Path(sys.executable).with_name("dsv")
    found = str(exe) if exe.exists() else shutil.which("dsv")
    assert found, "the dsv console script is not installed"
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([_dsv(), "rl", "grpo", *args], capture_output=True, text=True, env=env, timeout=600)


def test_grpo_end_to_end_through_the_console_script(warm_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = _run("--model", str(warm_model), "--out", str(out), "--steps", "3", "--top-k", "32", "--beta", "0.01",
             "--family-beta", "combinatorics=0.02", "--reward", "verifier", "--reward", "format=0.5", *BASE)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "grpo: 3 steps" in r.stdout and "checkpoint" in r.stdout
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in rows] == [1, 2, 3]
    for key in ("reward", "accuracy", "reward/combinatorics", "accuracy/combinatorics", "loss/kl_ref", "loss/clip_frac_low",
                "loss/opsm_masked_frac", "route_mismatch", "rollout_train_kl", "response_length",
                "rollout_tokens_per_second", "train_tokens_per_second", "reward_term/format"):  # fmt: skip
        assert key in rows[-1], key
    model, tok = load_pretrained(out / "final")  # the layout dsv generate / dsv serve load
    assert tok is not None and model.config.vocab_size == 1024
    assert (out / "rl.png").stat().st_size > 0 and (out / "summary.json").exists()
    gen = subprocess.run([_dsv(), "generate", str(out / "final"), "--prompt", "hello", "--max-new-tokens", "4"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert gen.returncode == 0, gen.stderr


def _one_line_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode != 0
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_inputs_are_one_line_errors(warm_model: Path, tmp_path: Path) -> None:
    m = ["--model", str(warm_model), "--steps", "1"]
    _one_line_error(_run(*m, "--out", str(tmp_path / "a"), *BASE, "--tasks", "arithmetc"), "unknown family", "arithmetic")
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_here\n")
    _one_line_error(_run(*m, "--out", str(tmp_path / "b"), *BASE, "--reward", f"{broken}:fn"),
                    "does not import", "ModuleNotFoundError")  # fmt: skip
    _one_line_error(_run(*m, "--out", str(tmp_path / "c"), *BASE, "--group-size", "1"), "--group-size must be at least 2")
    _one_line_error(_run("--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "d"), *BASE), "not a checkpoint folder")
    _one_line_error(_run(*m, "--out", str(tmp_path / "e"), *BASE, "--kl", "k2"), "--kl must be one of")


def test_a_diverging_run_stops_with_the_last_good_checkpoint(warm_model: Path, tmp_path: Path) -> None:
    # From the second step on, the reward explodes: a group's mean overflows and so does the loss.
    blowup = tmp_path / "blowup.py"
    blowup.write_text("calls = 0\n\ndef reward(**_):\n    global calls\n    calls += 1\n    return 0.0 if calls <= 8 else 1e38\n")
    out = tmp_path / "run"
    r = _run("--model", str(warm_model), "--out", str(out), "--steps", "4", "--save-every", "1",
             "--reward", f"{blowup}:reward", *BASE)  # fmt: skip
    _one_line_error(r, "diverged at step 2", "checkpoint-0000001")
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-0000001"]
    assert not (out / "final").exists()
    load_pretrained(out / "checkpoint-0000001")


def test_help_documents_every_switch() -> None:
    import dataclasses

    from dsv.rl.trainer import GRPOConfig

    r = subprocess.run([_dsv(), "rl", "grpo", "--help"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "COLUMNS": "250"})  # fmt: skip
    assert r.returncode == 0
    internal = {"plot", "tensorboard", "engine_blocks", "rewards", "family_beta"}
    for f in dataclasses.fields(GRPOConfig):
        if f.name not in internal:
            assert "--" + f.name.replace("_", "-") in r.stdout, f.name
    assert "--reward" in r.stdout and "--family-beta" in r.stdout and "--keep-routing" in r.stdout


@pytest.mark.parametrize("flag", ["--no-keep-routing", "--no-keep-sampling-mask"])
def test_stabilisers_switch_off(warm_model: Path, tmp_path: Path, flag: str) -> None:
    out = tmp_path / "run"
    r = _run("--model", str(warm_model), "--out", str(out), "--steps", "1", "--top-k", "32", "--tis-cap", "2",
             "--opsm-delta", "0.1", "--level", "sequence", "--aggregation", "dapo", flag, *BASE)  # fmt: skip
    assert r.returncode == 0, r.stderr
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert "loss/tis_weight_mean" in row and "route_mismatch" in row
