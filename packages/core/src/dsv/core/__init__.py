"""dsv-core: the DeepSeek-V3.2 model, its Hugging Face checkpoints, chat encoding and generation.

Heavy submodules (torch) are imported on first attribute access so that ``import dsv.core`` and the
CLI stay fast.
"""

from __future__ import annotations

from dsv.core.lazy import lazy_exports

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


__getattr__, __dir__ = lazy_exports(globals(), _LAZY)
