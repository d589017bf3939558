"""dsv-core: the DeepSeek-V3.2 model, its Hugging Face checkpoints, chat encoding and generation.

Heavy submodules (torch) are imported on first attribute access so that ``import dsv.core`` and the
CLI stay fast.

``generate`` is the sampling module (:func:`dsv.core.generate.generate`, ``SamplingParams``,
``sample_next``): Python binds a package attribute to a submodule of that name as soon as it is
imported anywhere, so a function exported under the module's name would turn into the module
depending on what ran before. ``SamplingParams`` is exported as well.
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


_lazy_getattr, __dir__ = lazy_exports(globals(), _LAZY)


def __getattr__(name: str) -> object:
    # The module, never the function of the same name (see the module docstring): the import binds
    # dsv.core.generate to it, and every later access finds the same object.
    if name == "generate":
        import importlib

        return importlib.import_module("dsv.core.generate")
    return _lazy_getattr(name)
