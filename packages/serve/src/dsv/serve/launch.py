"""Build and start a server: the native engine, or vLLM/SGLang behind dsv's HTTP layer.

``dsv serve PATH --engine vllm|sglang`` starts that engine on a private loopback port with its
DeepSeek-V3.2 options and serves dsv's API in front of it (chat encoding and parsing by dsv,
generation by the engine's ``/v1/completions``):

- vLLM: ``vllm serve PATH --tokenizer-mode deepseek_v32 --tool-call-parser deepseek_v32
  --enable-auto-tool-choice --reasoning-parser deepseek_v3``
- SGLang: ``python -m sglang.launch_server --model PATH --tool-call-parser deepseekv32
  --reasoning-parser deepseek-v3``

Run: ``dsv serve PATH [--engine native|vllm|sglang]``.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["engine_command", "free_port", "load_native_app", "load_proxy_app", "start_engine", "wait_ready"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def engine_command(
    engine: str,
    path: str,
    *,
    host: str,
    port: int,
    model_name: str,
    extra: list[str] | None = None,
    max_model_len: int | None = None,
    dtype: str | None = None,
) -> list[str]:
    """The command line that starts ``engine`` for the checkpoint at ``path``.

    ``max_model_len`` and ``dtype`` (``bfloat16``, ``float16``, ``float32``) become the engine's own
    flags; ``extra`` (e.g. ``["--tensor-parallel-size", "8"]``) is appended as given.
    """
    own: list[str] = []
    if max_model_len is not None:
        own += ["--max-model-len" if engine == "vllm" else "--context-length", str(max_model_len)]
    if dtype is not None:
        own += ["--dtype", dtype]
    if engine == "vllm":
        cmd = [
            "vllm", "serve", path,
            "--tokenizer-mode", "deepseek_v32",
            "--tool-call-parser", "deepseek_v32",
            "--enable-auto-tool-choice",
            "--reasoning-parser", "deepseek_v3",
            "--host", host, "--port", str(port),
            "--served-model-name", model_name,
        ]  # fmt: skip
    elif engine == "sglang":
        cmd = [
            sys.executable, "-m", "sglang.launch_server",
            "--model", path,
            "--tool-call-parser", "deepseekv32",
            "--reasoning-parser", "deepseek-v3",
            "--host", host, "--port", str(port),
            "--served-model-name", model_name,
        ]  # fmt: skip
    else:
        raise ValueError(f"unknown engine {engine!r}; choose native, vllm or sglang")
    return cmd + own + list(extra or [])


def start_engine(cmd: list[str]) -> subprocess.Popen[bytes]:
    """Start the engine process (its output goes to this process's stderr)."""
    return subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr)


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None = None, timeout_s: float = 1800.0) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` exits."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the engine exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


def _tokenizer_and_templates(folder: Path) -> tuple[object, object, int, int]:
    """Tokenizer, chat templates, max positions and vocabulary size of a checkpoint folder."""
    from dsv.core.chat import Templates
    from dsv.core.checkpoint import load_config
    from dsv.core.tokenizer import Tokenizer

    config = load_config(folder)
    return (Tokenizer.load(folder), Templates.from_checkpoint(folder), int(config.max_position_embeddings),
            int(config.vocab_size))  # fmt: skip


def _max_len(asked: int | None, max_positions: int) -> int:
    """The served context length: ``asked`` if the model's positions reach it, else theirs."""
    if asked is not None and asked > max_positions:
        raise ValueError(
            f"max_model_len {asked} is longer than the model's max_position_embeddings ({max_positions}); "
            f"ask for at most {max_positions}"
        )
    return asked or max_positions


def load_native_app(
    path_or_repo: str,
    *,
    model_name: str | None = None,
    max_model_len: int | None = None,
    num_blocks: int | None = None,
    block_size: int = 16,
    max_batch: int = 64,
    prefill_chunk: int = 512,
    device: str = "cpu",
    dtype: Any = None,
    engine_process: bool = True,
    threads: int | None = None,
    staging: bool | None = None,
    **settings: object,
) -> object:
    """The FastAPI app serving a checkpoint with the native engine (engine started).

    ``engine_process`` (the default) runs the engine in its own process
    (:class:`~dsv.serve.worker.EngineProcess`) so model work and HTTP do not share one GIL; False
    keeps it in a thread of this process. ``threads`` sets the engine's torch threads (default:
    torch's own choice, which follows ``OMP_NUM_THREADS``). ``dtype`` (a ``torch.dtype`` or a name
    such as ``"bfloat16"``; default: bfloat16 on a GPU, float32 on the CPU) is the weights' and the
    cache's. ``staging=False`` decodes from the pool's blocks (``--num-blocks`` then bounds the
    cache) instead of the dense per-request rows; None (the default) stages on a CPU only: on a GPU
    the Triton sparse kernel reads the selected rows through the block tables.
    """
    from dsv.core.checkpoint import resolve
    from dsv.core.cli import resolve_dtype
    from dsv.serve.app import ServerSettings, create_app
    from dsv.serve.backend import LocalBackend

    if dtype is None or isinstance(dtype, str):
        dtype = resolve_dtype(dtype or "auto", device)
    folder = resolve(path_or_repo)
    tokenizer, templates, max_positions, vocab = _tokenizer_and_templates(folder)
    max_len = _max_len(max_model_len, max_positions)
    # Settings are checked before the engine (a process holding the model) starts.
    name = model_name or Path(str(path_or_repo).rstrip("/")).name
    server_settings = ServerSettings(model_name=name, **settings)  # type: ignore[arg-type]
    if staging is None:
        staging = device.split(":")[0] == "cpu"
    blocks, capacity = cache_budget(num_blocks, block_size=block_size, max_batch=max_batch, max_len=max_len,
                                    staging=staging)  # fmt: skip
    kwargs = {
        "num_blocks": blocks,
        "block_size": block_size,
        "max_batch": max_batch,
        "prefill_chunk": prefill_chunk,
        "staging": capacity is not None,
        "staging_capacity": capacity,
    }
    engine: Any
    if engine_process:
        from dsv.serve.worker import EngineProcess

        engine = EngineProcess(folder, device=device, dtype=dtype, threads=threads, **kwargs)
    else:
        import torch

        from dsv.core.checkpoint import load_pretrained
        from dsv.serve.engine import Engine

        if threads is not None:
            torch.set_num_threads(threads)
        model, _ = load_pretrained(str(folder), device=device, dtype=dtype, with_tokenizer=False)
        engine = Engine.for_model(model.eval(), model.config, device=device, dtype=dtype, tokenizer=tokenizer,
                                  **kwargs)  # fmt: skip
    engine.start()
    backend = LocalBackend(engine, tokenizer, templates=templates, max_model_len=max_len, vocab_size=vocab)
    return create_app(backend, server_settings)


def cache_budget(
    num_blocks: int | None, *, block_size: int, max_batch: int, max_len: int, staging: bool
) -> tuple[int, tuple[int, int] | None]:
    """Split the cache budget: ``(pool blocks, staging (rows, length) or None)``.

    ``num_blocks`` (``--num-blocks``) bounds the whole cache, staging rows included: with staging,
    up to half of it (never what one full-length request needs) becomes rows of ``min(max_len,
    1024)`` positions, at most ``max_batch`` of them. Without ``num_blocks`` the pool gets its default
    size (``max_batch`` requests of up to 1,024 tokens, at least 64 blocks and one full-length
    request) and the staging rows come on top: one row per batch slot. A ``num_blocks`` smaller than
    one full-length request is a ``ValueError`` naming the shortfall.
    """
    # One request of the full context length must fit in the pool: the HTTP layer admits any request
    # up to max_model_len, so a smaller pool would refuse requests the API has accepted.
    full = -(-max_len // block_size)
    if num_blocks is not None and num_blocks < full:
        raise ValueError(
            f"the cache holds {num_blocks} blocks of {block_size} tokens ({num_blocks * block_size} tokens), less "
            f"than one request of the full context length ({max_len} tokens, {full} blocks); raise --num-blocks "
            "to at least that or lower --max-model-len"
        )
    row_len = min(max_len, 1024)
    if num_blocks is None:
        pool = max(64, (max_batch * row_len) // block_size, full)
        return pool, ((max_batch, row_len) if staging else None)
    if not staging:
        return num_blocks, None
    region = min(num_blocks // 2, num_blocks - full)  # blocks' worth of staging positions
    rows = min(max_batch, region * block_size // row_len)
    if rows < 1:
        return num_blocks, None
    return num_blocks - -(-rows * row_len // block_size), (rows, row_len)


def load_proxy_app(
    path: str, base_url: str, *, model_name: str | None = None, engine_model: str | None = None,
    max_model_len: int | None = None, **settings: object,
) -> object:  # fmt: skip
    """The FastAPI app that encodes with dsv and forwards to an engine at ``base_url``."""
    from dsv.serve.app import ServerSettings, create_app
    from dsv.serve.backend import ProxyBackend

    folder = Path(path)
    tokenizer, templates, max_positions, vocab = _tokenizer_and_templates(folder)
    name = model_name or folder.name
    backend = ProxyBackend(base_url, engine_model or name, tokenizer, templates=templates,  # type: ignore[arg-type]
                           max_model_len=_max_len(max_model_len, max_positions), vocab_size=vocab)  # fmt: skip
    return create_app(backend, ServerSettings(model_name=name, **settings))  # type: ignore[arg-type]
