"""``device_map``-style placement planned from the config: V3.2 over 16 GPUs of 96 GiB (a plan only:
no device is touched), and a tiny model actually placed over the CPU and the meta device.

Run: ``pytest packages/core/tests/test_core_device_map.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsv.core.checkpoint import _cast
from dsv.core.device_map import place, plan_device_map
from dsv.core.errors import CheckpointError, DSVError
from dsv.core.model import DSVForCausalLM
from dsv.core.presets import preset

GIB = 1024**3


def _order(plan_units: dict[str, str], devices: list[str]) -> list[int]:
    return [devices.index(d) for d in plan_units.values()]


def test_v32_over_sixteen_devices() -> None:
    cfg = preset("v32")
    devices = [f"cuda:{i}" for i in range(16)]
    plan = plan_device_map(cfg, devices, max_memory=dict.fromkeys(devices, 96 * GIB))
    units = list(plan.units)
    assert units[:2] == ["model.embed_tokens", "model.layers.0"]
    assert units[-3:] == ["model.norm", "lm_head", "model.layers.61"]  # MTP sits with the head
    assert len(units) == 1 + 61 + 2 + 1
    order = _order(plan.units, devices)
    assert order == sorted(order) and set(order) == set(range(16))  # contiguous, every device used
    assert plan.units["model.layers.61"] == plan.units["lm_head"] == "cuda:15"
    total = sum(plan.bytes.values())
    assert 1270 * GIB < total < 1285 * GIB  # 685B parameters in bf16 (routers and weights_proj in fp32)
    moe_layer = 21.5 * GIB  # one MoE block, the largest unit
    assert max(plan.bytes.values()) <= 96 * GIB
    assert max(plan.bytes.values()) - total / 16 < moe_layer
    assert plan.device_of("model.layers.30.mlp.experts.7.up_proj.weight") == plan.units["model.layers.30"]
    with pytest.raises(KeyError, match="no unit"):
        plan.device_of("model.bogus.weight")
    with pytest.raises(
        DSVError, match=r"needs 1276\.8 GiB in bfloat16, but the 8 device\(s\) hold 768\.0 GiB"
    ):
        plan_device_map(cfg, devices[:8], max_memory=dict.fromkeys(devices[:8], 96 * GIB))


def test_plan_bytes_match_the_loaded_model_and_placement_on_cpu_and_meta() -> None:
    cfg = preset("tiny")
    with torch.device("meta"):
        meta = _cast(DSVForCausalLM(cfg), torch.bfloat16)
    want = sum(t.numel() * t.element_size() for t in meta.state_dict().values())
    plan = plan_device_map(cfg, ["cpu", "meta"], dtype=torch.bfloat16)
    assert sum(plan.bytes.values()) == want  # the loader's dtypes, fp32 router and weights_proj included
    assert set(plan.bytes) == {"cpu", "meta"}
    place(meta, plan)
    for name, tensor in meta.state_dict().items():
        assert tensor.device.type == plan.device_of(name), name
    assert meta.model.embed_tokens.weight.device.type == "cpu"  # materialised, for the loader to fill
    assert plan.units["model.layers.2"] == "meta" and meta.model.layers[2].eh_proj.weight.is_meta
    # a materialised model is moved (values kept) rather than re-allocated
    torch.manual_seed(0)
    model = DSVForCausalLM(cfg)
    embed = model.model.embed_tokens.weight.detach().clone()
    place(model, plan_device_map(cfg, ["cpu"]))
    assert torch.equal(model.model.embed_tokens.weight, embed)


def test_bad_plans_are_one_line_errors() -> None:
    cfg = preset("tiny")
    with pytest.raises(DSVError, match="at least one device"):
        plan_device_map(cfg, [])
    with pytest.raises(DSVError, match="must be distinct"):
        plan_device_map(cfg, ["cpu", "cpu"])
    with pytest.raises(DSVError, match="max_memory names device"):
        plan_device_map(cfg, ["cpu"], max_memory={"cuda:3": GIB})
    # enough bytes in all, but no way to split the units: the last one left over is named
    with pytest.raises(DSVError, match=r"model\.layers\.2 \(0\.00 GiB\) does not fit on any device left"):
        plan_device_map(cfg, ["cpu", "meta"], max_memory={"cpu": 5000, "meta": 946_956})
    with pytest.raises(DSVError, match=r"has no module model\.layers\.3"):
        place(DSVForCausalLM(cfg), plan_device_map(cfg.replace(num_hidden_layers=10), ["cpu"]))


def test_load_pretrained_places_each_unit_on_its_planned_device(tmp_path: Path) -> None:
    from dsv.core.checkpoint import load_pretrained, read_state_dict, save_pretrained

    cfg = preset("tiny")
    torch.manual_seed(0)
    save_pretrained(DSVForCausalLM(cfg), None, tmp_path / "ckpt")
    stored = read_state_dict(tmp_path / "ckpt")
    plan = plan_device_map(cfg, ["cpu", "meta"], dtype=torch.float32)
    model, _ = load_pretrained(tmp_path / "ckpt", device_map=plan, with_tokenizer=False)
    on_cpu = 0
    for name, tensor in model.state_dict().items():
        assert tensor.device.type == plan.device_of(name), name
        if tensor.device.type == "cpu":
            assert torch.equal(tensor, stored[name]), name
            on_cpu += 1
    assert on_cpu and on_cpu < len(stored)
    # one device: the same model as a plain load, probe forward included
    single, _ = load_pretrained(
        tmp_path / "ckpt", device_map=plan_device_map(cfg, ["cpu"]), with_tokenizer=False
    )
    plain, _ = load_pretrained(tmp_path / "ckpt", with_tokenizer=False)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(single(ids).logits, plain(ids).logits)
    other = plan_device_map(cfg.replace(num_hidden_layers=1), ["cpu"])
    with pytest.raises(CheckpointError, match=r"device_map has no place for model\.layers\.2\."):
        load_pretrained(tmp_path / "ckpt", device_map=other, with_tokenizer=False)
