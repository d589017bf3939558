"""Torch references for the indexer distillation loss and its head-summed attention target (core's)."""

from __future__ import annotations

from dsv.core.attention import attention_probs_summed_reference, indexer_kl_loss_reference

__all__ = ["attention_probs_summed_reference", "indexer_kl_loss_reference"]
