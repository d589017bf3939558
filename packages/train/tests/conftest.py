"""Shared fixtures: a tiny pretrained checkpoint made once per session by the real trainer."""

from __future__ import annotations

from pathlib import Path

import pytest

SMALL = {
    "seq_len": 48,
    "micro_batch_size": 2,
    "default_data_size": 160,
    "progress": False,
    "tensorboard": False,
}


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dsv.train import TrainConfig, train

    out = tmp_path_factory.mktemp("pretrain")
    train(TrainConfig(stage="pretrain", model="tiny", out=out, steps=3, save_every=0, **SMALL))
    return out
