"""Shared fixtures: a tiny chat model briefly supervised on one exact-answer synth family."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The warm start lives beside the tests (importlib mode: no package, so put the folder on the path).
sys.path.insert(0, str(Path(__file__).parent))

FAMILY = "combinatorics"


@pytest.fixture(scope="session")
def warm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny, 60 supervised steps on combinatorics: answers in the format, rarely right (seconds)."""
    from _warmstart import warm_start

    return warm_start(tmp_path_factory.mktemp("warm") / "model", FAMILY, steps=60, n_tasks=200)
