"""Each stage runs a few steps of the tiny preset on CPU; the warm-up changes only the indexer.

Run: ``pytest packages/train/tests/test_train_stages.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsv.core.checkpoint import load_pretrained, read_state_dict
from dsv.train import TrainConfig, train

SMALL = {
    "seq_len": 48,
    "micro_batch_size": 2,
    "default_data_size": 160,
    "progress": False,
    "tensorboard": False,
}


def test_pretrain_writes_checkpoint_metrics_and_plot(pretrained: Path) -> None:
    model, tok = load_pretrained(pretrained / "final")
    assert tok is not None and model.config.model_type == "deepseek_v32"
    metrics = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["loss"] > 0 and m["tokens_per_second"] > 0 for m in metrics)
    assert (pretrained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((pretrained / "summary.json").read_text())
    assert summary["val_loss"] is not None and summary["steps"] == 3
    # the aux-loss-free balance update moved the MoE routing bias away from zero
    assert any(m.gate.e_score_correction_bias.abs().sum() > 0 for m in model.moe_layers)


def test_dsa_warmup_changes_only_the_indexer(pretrained: Path, tmp_path: Path) -> None:
    summary = train(TrainConfig(stage="dsa-warmup", model=str(pretrained / "final"), out=tmp_path, steps=3,
                                save_every=0, **SMALL))  # fmt: skip
    before, after = read_state_dict(pretrained / "final"), read_state_dict(tmp_path / "final")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    indexers = {k for k in before if ".self_attn.indexer." in k}
    assert changed, "the warm-up changed nothing"
    assert changed <= indexers, f"non-indexer tensors changed: {sorted(changed - indexers)[:5]}"
    # every indexer learns, the MTP layer's (model.layers.2) included: it selects keys like the others
    for layer in (0, 1, 2):
        assert f"model.layers.{layer}.self_attn.indexer.wq_b.weight" in changed, layer
        assert f"model.layers.{layer}.self_attn.indexer.weights_proj.weight" in changed, layer
    assert summary.recall_before is not None and summary.recall_after is not None
    assert 0.0 < summary.recall_before <= 1.0 and 0.0 < summary.recall_after <= 1.0
    assert summary.mtp_recall_before is not None and summary.mtp_recall_after is not None
    assert 0.0 < summary.mtp_recall_before <= 1.0 and 0.0 < summary.mtp_recall_after <= 1.0
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("indexer_loss" in m and "loss" not in m for m in metrics)


def test_dsa_sparse_trains_backbone_and_indexer(pretrained: Path, tmp_path: Path) -> None:
    train(
        TrainConfig(
            stage="dsa-sparse", model=str(pretrained / "final"), out=tmp_path, steps=2, save_every=0, **SMALL
        )
    )
    before, after = read_state_dict(pretrained / "final"), read_state_dict(tmp_path / "final")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "model.layers.0.self_attn.kv_b_proj.weight" in changed  # LM loss reaches the backbone
    assert "model.layers.1.self_attn.indexer.wq_b.weight" in changed  # KL loss on the selected set
    assert "model.layers.2.self_attn.indexer.wq_b.weight" in changed  # the MTP layer's indexer too
    assert "model.layers.2.mlp.gate.e_score_correction_bias" in changed  # the MTP MoE is balanced
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(m["indexer_loss"] > 0 and m["loss"] > 0 for m in metrics)


def test_sft_runs_on_default_chat_data(tmp_path: Path) -> None:
    import math

    summary = train(TrainConfig(stage="sft", model="tiny", out=tmp_path, steps=2, save_every=0, **SMALL))
    model, tok = load_pretrained(tmp_path / "final")
    assert tok is not None
    # A fresh random model predicts about uniformly: its cross-entropy is near ln(vocab), and finite.
    uniform = math.log(model.config.vocab_size)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[-1]["loss"] == pytest.approx(summary.final_loss)
    for loss in (*(m["loss"] for m in metrics), summary.val_loss):
        assert loss is not None and abs(loss - uniform) < 1.5, (loss, uniform)
    assert summary.steps == 2 and summary.tokens > 0


def test_dense_pretrain_of_v3_model_and_warmup_refusal(tmp_path: Path) -> None:
    from dsv.core.checkpoint import save_pretrained
    from dsv.core.model import DSVForCausalLM
    from dsv.core.presets import tiny
    from dsv.core.tokenizer import default_corpus, train_bpe
    from dsv.train import TrainError

    src = tmp_path / "v3"
    save_pretrained(DSVForCausalLM(tiny(model_type="deepseek_v3")), train_bpe(default_corpus(300), 1024), src)
    train(TrainConfig(stage="pretrain", model=str(src), out=tmp_path / "run", steps=1, save_every=0, **SMALL))
    try:
        train(TrainConfig(stage="dsa-warmup", model=str(src), out=tmp_path / "w", steps=1, **SMALL))
    except TrainError as exc:
        assert "convert --add-indexer" in str(exc)
    else:
        raise AssertionError("dsa-warmup accepted a model without an indexer")
