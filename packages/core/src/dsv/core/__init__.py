"""dsv-core: the DeepSeek-V3.2 model, its Hugging Face checkpoints, chat encoding and generation.

Heavy submodules (torch) are imported on first attribute access so that ``import dsv.core`` and the
CLI stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "DSVError",
    "DSVForCausalLM",
    "DenseKVCache",
    "ModelConfig",
    "ModelOutput",
    "SamplingParams",
    "Tokenizer",
    "generate",
    "load_pretrained",
    "presets",
    "save_pretrained",
]

_LAZY = {
    "DSVError": "dsv.core.errors",
    "ModelConfig": "dsv.core.config",
    "DSVForCausalLM": "dsv.core.model",
    "ModelOutput": "dsv.core.model",
    "DenseKVCache": "dsv.core.cache",
    "SamplingParams": "dsv.core.generate",
    "generate": "dsv.core.generate",
    "Tokenizer": "dsv.core.tokenizer",
    "load_pretrained": "dsv.core.checkpoint",
    "save_pretrained": "dsv.core.checkpoint",
    "presets": "dsv.core.presets",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return module if name == "presets" else getattr(module, name)
    raise AttributeError(f"module 'dsv.core' has no attribute {name!r}")
