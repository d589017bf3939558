"""The MTP layer in training (its indexer warms up, its MoE is balanced, gamma drops to 0 on
schedule) and ``--recipe v32`` (the published values, each with its source).

Run: ``pytest packages/train/tests/test_train_mtp_recipe.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dsv.core.checkpoint import load_pretrained, read_state_dict, save_pretrained
from dsv.core.model import DSVForCausalLM
from dsv.core.presets import tiny
from dsv.train import TrainConfig, train
from dsv.train.cli import train_app
from dsv.train.recipes import RecipeError, apply_recipe, get_recipe

SMALL = {
    "seq_len": 48,
    "micro_batch_size": 2,
    "default_data_size": 160,
    "progress": False,
    "tensorboard": False,
    "save_every": 0,
}
MTP_BIAS = "model.layers.2.mlp.gate.e_score_correction_bias"


def test_mtp_indexer_recall_rises_in_the_warmup(pretrained: Path, tmp_path: Path) -> None:
    # Weights drawn at 5x the preset's std give peaked attention, so a top-k set can miss mass (the
    # 3-step fixture's attention is nearly uniform: every indexer's recall is already the oracle's).
    _, tok = load_pretrained(pretrained / "final")
    torch.manual_seed(0)
    save_pretrained(DSVForCausalLM(tiny(initializer_range=0.1)), tok, tmp_path / "start")
    # 48-token rows: the MTP layer sees 47 positions, 15 of them past index_topk = 32
    summary = train(TrainConfig(stage="dsa-warmup", model=str(tmp_path / "start"), out=tmp_path / "run", steps=20,
                                lr=3e-2, max_grad_norm=0.0, **SMALL))  # fmt: skip
    # Everything the MTP indexer sees is frozen in the warm-up, so an untrained MTP indexer would
    # keep its recall exactly (0.8084 here); it rises to 0.8144 (the main layers' 0.8023 -> 0.8104).
    assert summary.mtp_recall_before is not None and summary.mtp_recall_after is not None
    assert summary.mtp_recall_after > summary.mtp_recall_before + 0.003, (
        summary.mtp_recall_before, summary.mtp_recall_after)  # fmt: skip
    assert summary.recall_after is not None and summary.recall_before is not None
    assert summary.recall_after > summary.recall_before + 0.003


def _imbalanced(pretrained: Path, folder: Path) -> Path:
    """The pretrained checkpoint with the MTP router's bias pushing every token to expert 0 and 1."""
    model, tok = load_pretrained(pretrained / "final")
    with torch.no_grad():
        bias = model.mtp_moe_layers[0].gate.e_score_correction_bias
        bias.zero_()
        bias[:2] = 10.0  # top-2 routing: experts 0 and 1 take every MTP token
    save_pretrained(model, tok, folder)
    return folder


def test_mtp_gate_bias_moves_under_imbalance_until_gamma_stops(pretrained: Path, tmp_path: Path) -> None:
    start = _imbalanced(pretrained, tmp_path / "start")
    gamma = 0.01
    train(TrainConfig(stage="pretrain", model=str(start), out=tmp_path / "run", steps=2, bias_update_speed=gamma,
                      **SMALL))  # fmt: skip
    after = read_state_dict(tmp_path / "run" / "final")[MTP_BIAS]
    expected = torch.tensor([10.0 - 2 * gamma] * 2 + [2 * gamma] * 6)  # overloaded down, idle up, each step
    torch.testing.assert_close(after, expected)
    # gamma is 0 after bias_update_until of the steps: half of 2 steps = one update
    train(TrainConfig(stage="pretrain", model=str(start), out=tmp_path / "half", steps=2, bias_update_speed=gamma,
                      bias_update_until=0.5, **SMALL))  # fmt: skip
    half = read_state_dict(tmp_path / "half" / "final")[MTP_BIAS]
    torch.testing.assert_close(half, torch.tensor([10.0 - gamma] * 2 + [gamma] * 6))


def test_recipe_v32_values_and_precedence() -> None:
    sparse = get_recipe("v32", "dsa-sparse")
    values = {k: s.value for k, s in sparse.settings.items()}
    assert values["lr"] == 7.3e-6 and values["steps"] == 15000 and values["seq_len"] == 131072
    assert values["micro_batch_size"] * values["grad_accum"] == 480
    assert values["bias_update_speed"] == 1e-3 and values["bias_update_until"] == pytest.approx(14.3 / 14.8, 1e-3)
    assert values["aux_loss_alpha"] == 1e-4
    assert all(s.source for s in sparse.settings.values())
    warm = {k: s.value for k, s in get_recipe("v32", "dsa-warmup").settings.items()}
    assert warm["lr"] == 1e-3 and warm["steps"] == 1000 and warm["grad_accum"] * warm["micro_batch_size"] == 16
    assert apply_recipe(sparse, {"steps": 3})["steps"] == 3  # what the user gives wins
    with pytest.raises(RecipeError, match="sft"):
        get_recipe("v32", "sft")
    with pytest.raises(RecipeError, match="choose one of: v32"):
        get_recipe("v3.2", "dsa-sparse")


def test_recipe_command_prints_values_and_sources() -> None:
    result = CliRunner().invoke(train_app, ["recipe", "v32"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.output
    for needle in ("recipe v32 for dsa-warmup", "recipe v32 for dsa-sparse", "recipe v32 for pretrain",
                   "7.3e-06", "15000", "131072", "DeepSeek-V3.2-Exp report §2.1",
                   "DeepSeek-V3 report (arXiv:2412.19437) §4.2", "--bias-update-until", "0.9662"):  # fmt: skip
        assert needle in out, needle
    bad = CliRunner().invoke(train_app, ["recipe", "v32", "--stage", "sft"])
    assert bad.exit_code == 1 and "no published values for the sft stage" in bad.output


def test_stage_with_recipe_v32_runs_with_its_values_and_your_flags(pretrained: Path, tmp_path: Path) -> None:
    out = tmp_path / "sparse"
    args = ["dsa-sparse", "--recipe", "v32", "--model", str(pretrained / "final"), "--out", str(out),
            "--steps", "1", "--seq-len", "48", "--micro-batch-size", "2", "--grad-accum", "1",
            "--default-data-size", "160", "--save-every", "0", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(train_app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "recipe v32 for dsa-sparse" in result.output and "(replaced by your flag)" in result.output
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["lr"] == 7.3e-6 and cfg["aux_loss_alpha"] == 1e-4 and cfg["bias_update_until"] == 0.9662
    assert cfg["steps"] == 1 and cfg["seq_len"] == 48 and cfg["grad_accum"] == 1  # the flags given win
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["lr"] == 7.3e-6
