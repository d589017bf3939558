"""ModelConfig <-> config.json: round trips, strict reading with errors that name the field, presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv.core.config import ModelConfig
from dsv.core.errors import ConfigError
from dsv.core.model import count_parameters
from dsv.core.presets import PRESETS, preset, small, tiny, v32


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_hf_dict(name: str) -> None:
    cfg = preset(name)
    assert ModelConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg


def test_v32_matches_the_release() -> None:
    counts = count_parameters(v32())
    assert 684e9 < counts["total"] < 686e9  # "685B" with the MTP layer
    assert 671e9 < counts["total_without_mtp"] < 672e9
    assert 36e9 < counts["active_per_token"] < 39e9
    assert v32().kv_latent_dim == 576
    assert abs(v32().softmax_scale - 192**-0.5 * (0.1 * __import__("math").log(40) + 1) ** 2) < 1e-9


def test_small_is_in_range() -> None:
    assert 100e6 <= count_parameters(small())["total_without_mtp"] <= 300e6


def test_reads_transformers_rope_parameters() -> None:
    d = tiny().to_hf_dict()
    rs = d.pop("rope_scaling")
    d["rope_parameters"] = {**rs, "rope_type": "yarn", "rope_theta": d.pop("rope_theta")}
    assert ModelConfig.from_hf_dict(d) == tiny()


def test_unknown_field_is_named() -> None:
    d = tiny().to_hf_dict() | {"index_topk_typo": 3}
    with pytest.raises(ConfigError, match="index_topk_typo"):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hidden_size", 0),
        ("n_group", 3),
        ("topk_group", 9),
        ("qk_rope_head_dim", 7),
        ("model_type", "llama"),
        ("q_lora_rank", None),
        ("scoring_func", "softmax"),
        ("index_head_dim", 4),
    ],
)
def test_invalid_values_name_the_field(field: str, value: object) -> None:
    d = tiny().to_hf_dict() | {field: value}
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf_dict(d)


def test_bad_json_file_says_where(tmp_path: Path) -> None:
    p = tmp_path / "config.json"
    p.write_text('{"model_type": "deepseek_v32",\n "hidden_size": }')
    with pytest.raises(ConfigError, match="line 2"):
        ModelConfig.from_json_file(p)


def test_dense_v3_config_has_no_indexer() -> None:
    cfg = tiny(model_type="deepseek_v3", q_lora_rank=None)
    d = cfg.to_hf_dict()
    assert "index_topk" not in d and d["architectures"] == ["DeepseekV3ForCausalLM"]
    assert not ModelConfig.from_hf_dict(d).has_indexer
