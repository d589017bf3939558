"""Cross-package (end-to-end) tests: they drive the real `dsv` command in subprocesses."""

from __future__ import annotations

from pathlib import Path

import pytest
from dsv_e2e import run_dsv


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("e2e") / "tiny"
    run_dsv("model", "init", str(out), "--preset", "tiny")
    return out
