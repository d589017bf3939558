"""dsv-serve: the OpenAI-compatible server for DeepSeek-V3.2 checkpoints.

Native engine (continuous batching, chunked prefill, paged MLA/indexer cache with prefix caching)
or vLLM/SGLang behind the same HTTP layer. Start it with ``dsv serve PATH``; build it in Python::

    from dsv.serve import load_native_app
    app = load_native_app("./ckpt", max_model_len=2048)

Names are imported on first access, so light tools (``python -m dsv.serve.loadgen``) do not pull
in torch. Run the checks: ``pytest packages/serve/tests``.
"""

from __future__ import annotations

from dsv.core.lazy import lazy_exports

__all__ = [
    "APIError",
    "BlockPool",
    "DecodeStaging",
    "Engine",
    "EngineProcess",
    "GenParams",
    "LocalBackend",
    "PagedBatchView",
    "Piece",
    "ProxyBackend",
    "ServerSettings",
    "StagedBatchView",
    "create_app",
    "engine_command",
    "load_native_app",
    "load_proxy_app",
]

_LAZY = {
    "APIError": "dsv.serve.schemas",
    "BlockPool": "dsv.serve.paged_cache",
    "DecodeStaging": "dsv.serve.paged_cache",
    "Engine": "dsv.serve.engine",
    "EngineProcess": "dsv.serve.worker",
    "GenParams": "dsv.serve.engine",
    "LocalBackend": "dsv.serve.backend",
    "PagedBatchView": "dsv.serve.paged_cache",
    "Piece": "dsv.serve.backend",
    "ProxyBackend": "dsv.serve.backend",
    "ServerSettings": "dsv.serve.app",
    "StagedBatchView": "dsv.serve.paged_cache",
    "create_app": "dsv.serve.app",
    "engine_command": "dsv.serve.launch",
    "load_native_app": "dsv.serve.launch",
    "load_proxy_app": "dsv.serve.launch",
}


__getattr__, __dir__ = lazy_exports(globals(), _LAZY)
