"""Checkpoint folders: sharded save/load round trip, clear errors for broken folders, atomic saves."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv.core import checkpoint as ck
from dsv.core.errors import CheckpointError
from dsv.core.model import DSVForCausalLM
from dsv.core.presets import tiny


def test_sharded_round_trip(tmp_path: Path) -> None:
    model = DSVForCausalLM(tiny()).eval()
    out = ck.save_pretrained(model, None, tmp_path / "m", max_shard_bytes=200_000)
    index = json.loads((out / ck.INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    assert json.loads((out / "config.json").read_text())["model_type"] == "deepseek_v32"
    assert (out / "generation_config.json").exists()
    loaded, tok = ck.load_pretrained(out)
    assert tok is None
    x = torch.randint(0, 1024, (1, 40))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_bf16_load_keeps_router_in_fp32(tmp_path: Path) -> None:
    out = ck.save_pretrained(DSVForCausalLM(tiny()), None, tmp_path / "m", dtype=torch.bfloat16)
    model, _ = ck.load_pretrained(out, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.moe_layers[0].gate.weight.dtype == torch.float32
    assert model.moe_layers[0].gate.e_score_correction_bias.dtype == torch.float32
    for layer in [*model.blocks, *model.mtp_layers]:  # the MTP layer's router and indexer as well
        if layer.self_attn.indexer is not None:
            assert layer.self_attn.indexer.weights_proj.weight.dtype == torch.float32
    assert model.mtp_moe_layers and all(m.gate.weight.dtype == torch.float32 for m in model.mtp_moe_layers)
    assert model.inv_freq.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 1024, (1, 8))).logits).all()


def _rewrite(folder: Path, fn) -> None:
    f = next(folder.glob("*.safetensors"))
    state = load_file(str(f))
    fn(state)
    save_file(state, str(f))
    index = json.loads((folder / ck.INDEX_NAME).read_text())
    index["weight_map"] = {k: f.name for k in state}
    (folder / ck.INDEX_NAME).write_text(json.dumps(index))


def test_missing_and_misshaped_tensors_are_listed(tmp_path: Path) -> None:
    out = ck.save_pretrained(DSVForCausalLM(tiny()), None, tmp_path / "m")

    def damage(state: dict) -> None:
        del state["model.layers.1.self_attn.indexer.wq_b.weight"]
        state["lm_head.weight"] = torch.zeros(3, 3)
        state["model.layers.9.surprise"] = torch.zeros(1)

    _rewrite(out, damage)
    with pytest.raises(CheckpointError) as info:
        ck.load_pretrained(out)
    msg = str(info.value)
    assert "indexer.wq_b.weight" in msg and "lm_head.weight (checkpoint (3, 3)" in msg and "surprise" in msg


def test_truncated_safetensors_is_named(tmp_path: Path) -> None:
    out = ck.save_pretrained(DSVForCausalLM(tiny()), None, tmp_path / "m")
    f = next(out.glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f.name):
        ck.load_pretrained(out)


def test_uncached_repo_while_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        ck.resolve("someone/not-cached-model")


def test_cached_repo_resolves_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A repo present in the hub cache layout loads with HF_HUB_OFFLINE=1 (no network)."""
    import huggingface_hub.constants as c

    cache = tmp_path / "cache"
    snap = cache / "models--acme--tiny" / "snapshots" / ("a" * 40)
    ck.save_pretrained(DSVForCausalLM(tiny()), None, snap)
    (cache / "models--acme--tiny" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, _ = ck.load_pretrained("acme/tiny")
    assert model.config.model_type == "deepseek_v32"


def test_failed_save_leaves_previous_checkpoint_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = DSVForCausalLM(tiny())
    out = ck.save_pretrained(model, None, tmp_path / "m")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "write_weights", boom)
    with pytest.raises(OSError, match="No space"):
        ck.save_pretrained(DSVForCausalLM(tiny()), None, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    ck.load_pretrained(out)


def test_atomic_write_json(tmp_path: Path) -> None:
    p = tmp_path / "a" / "state.json"
    ck.atomic_write_json(p, {"step": 3})
    assert json.loads(p.read_text()) == {"step": 3}
    assert os.listdir(p.parent) == ["state.json"]
