"""Weights are checked at load: an integer tensor or a dtype config.json does not name, and NaN
weights (a probe forward that is not finite), are a CheckpointError naming the tensors, not junk
output or a sampling traceback later.

Run: ``pytest packages/core/tests/test_core_checkpoint_validation.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv.core import checkpoint as ck
from dsv.core.errors import CheckpointError


def _damaged(src: Path, dest: Path, fn) -> Path:  # type: ignore[no-untyped-def]
    shutil.copytree(src, dest)
    for f in dest.glob("*.safetensors"):
        state = load_file(str(f))
        fn(state)
        save_file(state, str(f))
    return dest


def test_int32_embedding_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    def to_int(state: dict[str, torch.Tensor]) -> None:
        key = "model.embed_tokens.weight"
        if key in state:
            state[key] = state[key].to(torch.int32)

    folder = _damaged(tiny_checkpoint, tmp_path / "int32", to_int)
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight \(int32\)") as info:
        ck.load_pretrained(folder)
    assert "float32 (or float32)" not in str(info.value) and "config.json" in str(info.value)


def test_dtype_other_than_config_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    def one_half(state: dict[str, torch.Tensor]) -> None:
        key = "lm_head.weight"
        if key in state:
            state[key] = state[key].to(torch.float16)

    folder = _damaged(tiny_checkpoint, tmp_path / "f16", one_half)
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "float32"
    with pytest.raises(CheckpointError, match=r"lm_head\.weight \(float16\)"):
        ck.load_pretrained(folder)


def test_nan_weights_fail_the_probe_forward(tiny_checkpoint: Path, tmp_path: Path) -> None:
    def poison(state: dict[str, torch.Tensor]) -> None:
        key = "model.layers.0.mlp.down_proj.weight"
        if key in state:
            state[key][0, 0] = float("nan")

    folder = _damaged(tiny_checkpoint, tmp_path / "nan", poison)
    with pytest.raises(CheckpointError, match=r"not finite .*model\.layers\.0\.mlp\.down_proj\.weight"):
        ck.load_pretrained(folder)
    # the probe can be switched off (a big model's owner may skip it); the dtype check stays
    model, _ = ck.load_pretrained(folder, probe=False, with_tokenizer=False)
    assert torch.isnan(model.model.layers[0].mlp.down_proj.weight).any()


def test_good_checkpoint_passes_both_checks(tiny_checkpoint: Path) -> None:
    model, tok = ck.load_pretrained(tiny_checkpoint, probe=True)
    assert tok is not None and next(model.parameters()).dtype == torch.float32
