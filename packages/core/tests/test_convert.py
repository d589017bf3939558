"""``dsv model convert --add-indexer``: deepseek_v3 -> deepseek_v32 with a fresh indexer.

Run: ``pytest packages/core/tests/test_convert.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv.core.checkpoint import load_pretrained, read_state_dict, save_pretrained
from dsv.core.convert import add_indexer
from dsv.core.errors import CheckpointError
from dsv.core.model import DSVForCausalLM
from dsv.core.presets import tiny
from dsv.core.tokenizer import default_corpus, train_bpe


def _v3_checkpoint(folder: Path, **overrides: object) -> Path:
    cfg = tiny(model_type="deepseek_v3", **overrides)
    torch.manual_seed(0)
    model = DSVForCausalLM(cfg)
    save_pretrained(model, train_bpe(default_corpus(300), cfg.vocab_size), folder)
    return folder


def test_add_indexer_keeps_weights_and_loads_as_v32(tmp_path: Path) -> None:
    src = _v3_checkpoint(tmp_path / "v3")
    result = add_indexer(src, tmp_path / "v32", index_n_heads=4, index_head_dim=16, index_topk=8)
    model, tok = load_pretrained(result.out)
    assert tok is not None
    assert model.config.model_type == "deepseek_v32" and model.config.index_topk == 8
    # every original tensor is unchanged; the only new tensors are the indexers (main + MTP layers)
    before, after = read_state_dict(src), read_state_dict(result.out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    added = sorted(set(after) - set(before))
    assert added and all(".self_attn.indexer." in k for k in added)
    assert result.layers == model.config.num_hidden_layers + model.config.num_nextn_predict_layers
    # the converted model runs sparse attention (sequence longer than top-k)
    out = model(torch.randint(0, 1024, (1, 20)), use_sparse=True, return_indices=True)
    assert out.indices[0] is not None and out.indices[0].shape[-1] == 8
    cfg = json.loads((result.out / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV32ForCausalLM"] and "rope_interleave" not in cfg


def test_refuses_checkpoint_without_q_latent(tmp_path: Path) -> None:
    src = _v3_checkpoint(tmp_path / "v3", q_lora_rank=None)
    with pytest.raises(CheckpointError, match="q_lora_rank: null"):
        add_indexer(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_v32_and_existing_output(tmp_path: Path) -> None:
    src = _v3_checkpoint(tmp_path / "v3")
    (tmp_path / "taken").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        add_indexer(src, tmp_path / "taken")
    v32 = tmp_path / "v32"
    add_indexer(src, v32, index_n_heads=4, index_head_dim=16, index_topk=8)
    with pytest.raises(CheckpointError, match="already deepseek_v32"):
        add_indexer(v32, tmp_path / "again")


def test_cli_convert_error_is_one_line(tmp_path: Path) -> None:
    src = _v3_checkpoint(tmp_path / "v3", q_lora_rank=None)
    code = "from dsv.core.cli import model_app; model_app()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "convert", "--add-indexer", str(src), str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr
    assert "q latent" in proc.stderr
