"""dsv-serve: the OpenAI-compatible server for DeepSeek-V3.2 checkpoints.

Native engine (continuous batching, chunked prefill, paged MLA/indexer cache with prefix caching)
or vLLM/SGLang behind the same HTTP layer. Start it with ``dsv serve PATH``; build it in Python::

    from dsv.serve import load_native_app
    app = load_native_app("./ckpt", max_model_len=2048)

Run the checks: ``pytest packages/serve/tests``.
"""

from dsv.serve.app import ServerSettings, create_app
from dsv.serve.backend import LocalBackend, Piece, ProxyBackend
from dsv.serve.engine import Engine, GenParams
from dsv.serve.launch import engine_command, load_native_app, load_proxy_app
from dsv.serve.paged_cache import BlockPool, DecodeStaging, PagedBatchView, StagedBatchView
from dsv.serve.schemas import APIError
from dsv.serve.worker import EngineProcess

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
