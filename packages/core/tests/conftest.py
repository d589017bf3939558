"""Shared fixtures for dsv-core tests: seeded torch, a tiny random checkpoint on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny deepseek_v32 checkpoint with a trained BPE tokenizer, written once per session."""
    from dsv.core.checkpoint import save_pretrained
    from dsv.core.model import DSVForCausalLM
    from dsv.core.presets import tiny
    from dsv.core.tokenizer import default_corpus, train_bpe

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    tok = train_bpe(default_corpus(800), 1024)
    save_pretrained(DSVForCausalLM(tiny()), tok, out)
    return out
