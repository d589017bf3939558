"""dsv-train: the DeepSeek-V3.2 training recipe on accelerate.

Stages ``pretrain``, ``dsa-warmup``, ``dsa-sparse`` and ``sft`` (see :mod:`dsv.train.trainer`);
data sources and packing in :mod:`dsv.train.data`; measures (indexer recall, validation loss,
pass-key retrieval) in :mod:`dsv.train.metrics`; named loss terms in :mod:`dsv.train.losses`;
published recipes (``--recipe v32``) in :mod:`dsv.train.recipes`. torch is imported on first
attribute access.

    from dsv.train import TrainConfig, train
    train(TrainConfig(stage="pretrain", model="tiny", out="runs/tiny", steps=50))
"""

from __future__ import annotations

from dsv.core.lazy import lazy_exports

__all__ = [
    "STAGES",
    "BatchPlan",
    "DataError",
    "Document",
    "LossTerms",
    "PackedData",
    "Recipe",
    "TrainConfig",
    "TrainError",
    "TrainSummary",
    "default_documents",
    "encode_chat",
    "get_recipe",
    "indexer_recall",
    "lm_terms",
    "load_documents",
    "lr_at",
    "pack",
    "passkey_accuracy",
    "passkey_scores",
    "recall_stats",
    "train",
    "validation_loss",
]

_LAZY = {
    "STAGES": "dsv.train.trainer",
    "TrainConfig": "dsv.train.trainer",
    "TrainError": "dsv.train.trainer",
    "TrainSummary": "dsv.train.trainer",
    "train": "dsv.train.trainer",
    "BatchPlan": "dsv.train.data",
    "DataError": "dsv.train.data",
    "Document": "dsv.train.data",
    "PackedData": "dsv.train.data",
    "default_documents": "dsv.train.data",
    "encode_chat": "dsv.train.data",
    "load_documents": "dsv.train.data",
    "pack": "dsv.train.data",
    "indexer_recall": "dsv.train.metrics",
    "passkey_accuracy": "dsv.train.metrics",
    "passkey_scores": "dsv.train.metrics",
    "recall_stats": "dsv.train.metrics",
    "validation_loss": "dsv.train.metrics",
    "lr_at": "dsv.train.schedule",
    "LossTerms": "dsv.train.losses",
    "lm_terms": "dsv.train.losses",
    "Recipe": "dsv.train.recipes",
    "get_recipe": "dsv.train.recipes",
}


__getattr__, __dir__ = lazy_exports(globals(), _LAZY)
