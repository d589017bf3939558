"""Checkpoints written by transformers: a ``deepseek_v32`` model saved by ``save_pretrained`` from a
config with ``num_nextn_predict_layers: 1`` holds no MTP tensors (transformers has no MTP module),
which is what fine-tunes made with transformers, TRL or PEFT look like. dsv loads it without the
MTP module, says so once, and gives transformers' logits; a checkpoint missing only part of an MTP
layer is still an error naming the tensors.

Run: ``pytest packages/core/tests/test_core_fp8_transformers.py``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv.core.checkpoint import INDEX_NAME, load_pretrained, save_pretrained
from dsv.core.errors import CheckpointError
from dsv.core.model import DSVForCausalLM
from dsv.core.presets import tiny

transformers = pytest.importorskip("transformers")


def test_transformers_checkpoint_without_mtp_tensors_loads(tmp_path: Path) -> None:
    cfg = tiny(index_topk=16)  # num_nextn_predict_layers: 1, as transformers' own default
    assert cfg.num_nextn_predict_layers == 1
    hf_cfg = transformers.DeepseekV32Config(
        **{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type")}
    )
    torch.manual_seed(3)
    hf = transformers.DeepseekV32ForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["num_nextn_predict_layers"] == 1
    assert not any(k.startswith("model.layers.2.") for k in load_file(tmp_path / "hf" / "model.safetensors"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = load_pretrained(tmp_path / "hf")
    said = [str(w.message) for w in caught if "MTP" in str(w.message)]
    assert len(said) == 1 and "loading without the MTP module" in said[0]
    assert model.config.num_nextn_predict_layers == 0 and not model.mtp_layers
    x = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        assert (model(x).logits - hf(x).logits).abs().max().item() <= 1e-4  # the parity tests' bound


def test_a_partly_missing_mtp_layer_is_still_an_error(tmp_path: Path) -> None:
    torch.manual_seed(0)
    folder = save_pretrained(DSVForCausalLM(tiny()), None, tmp_path / "ckpt")
    shard = folder / "model-00001-of-00001.safetensors"
    state = load_file(shard)
    gone = "model.layers.2.eh_proj.weight"
    del state[gone]
    save_file(state, shard, metadata={"format": "pt"})
    index = json.loads((folder / INDEX_NAME).read_text())
    del index["weight_map"][gone]
    (folder / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"1 missing tensor\\(s\\): {gone}"):
        load_pretrained(folder)
