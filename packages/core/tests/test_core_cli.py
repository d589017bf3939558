"""The `dsv model` / `dsv generate` commands, run as a user would (subprocess), including bad input:
one-line errors, non-zero exit codes, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("dsv.cli")


def dsv(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dsv.cli.main", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def test_init_info_generate(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    r = dsv("model", "init", str(out), "--preset", "tiny")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["model_type"] == "deepseek_v32"
    r = dsv("model", "info", str(out))
    assert r.returncode == 0 and "active parameters per token" in r.stdout and "DSA" in r.stdout
    r = dsv("generate", str(out), "--prompt", "plan a trip", "--max-new-tokens", "5", "--seed", "0")
    assert r.returncode == 0, r.stderr
    assert "5 tokens" in r.stderr
    r = dsv("model", "init", str(out))
    assert r.returncode == 1 and "--force" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("model", "info", "/nonexistent/folder"), "no such folder"),
        (("model", "info", "--preset", "huge"), "unknown preset"),
        (("model", "info"), "either"),
        (("generate", "/nonexistent/x", "--prompt", "hi"), "no such folder"),
        (("generate", ".", "--prompt", "hi", "--dtype", "fp7"), "unknown dtype"),
        (("generate", "/nonexistent/x", "--prompt", "hi", "--device", "tpu"), "unknown device"),
        # sampling settings are checked before the checkpoint is looked at
        (("generate", "/nonexistent/x", "--prompt", "hi", "--presence-penalty", "3"), "presence_penalty"),
    ],
)
def test_user_errors_are_one_line(args: tuple[str, ...], needle: str) -> None:
    r = dsv(*args)
    assert r.returncode != 0
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_bad_config_field(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "deepseek_v32", "hidden_sise": 64}))
    r = dsv("model", "init", str(tmp_path / "out"), "--config", str(cfg))
    assert r.returncode == 1 and "hidden_sise" in r.stderr and "Traceback" not in r.stderr


def test_truncated_checkpoint_and_offline_repo(tmp_checkpoint_copy: Path, tmp_path: Path) -> None:
    f = next(tmp_checkpoint_copy.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:100])
    r = dsv("generate", str(tmp_checkpoint_copy), "--prompt", "x")
    assert r.returncode == 1 and f.name in r.stderr and "Traceback" not in r.stderr
    r = dsv(
        "model", "info", "nobody/nothing", env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "c")}
    )
    assert r.returncode == 1 and "offline" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture
def tmp_checkpoint_copy(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "copy"))
