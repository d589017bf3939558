"""``dsv serve PATH_OR_REPO``: the OpenAI-compatible server (thin Typer command).

Run: ``dsv serve ./ckpt --port 8000 [--api-key KEY] [--device cuda --dtype bfloat16]``, or with another
engine: ``dsv serve ./ckpt --engine vllm --engine-args "--tensor-parallel-size 8"``.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from dsv.cli.errors import ExitCode, fail

__all__ = ["serve"]

console = Console(stderr=True)


def serve(
    path_or_repo: str = typer.Argument(..., help="checkpoint folder or Hugging Face repo id"),
    host: str = typer.Option("127.0.0.1", help="address to listen on"),
    port: int = typer.Option(8000, help="port to listen on"),
    engine: str = typer.Option("native", help="native, vllm or sglang"),
    model_name: str = typer.Option(
        None, "--model-name", "--served-model-name", help="served model name (default: the folder name)"
    ),
    api_key: str = typer.Option(None, envvar="DSV_API_KEY", help="require this bearer key (or DSV_API_KEY)"),
    max_model_len: int = typer.Option(None, min=1, help="context length limit (default: the config's)"),
    max_tokens_limit: int = typer.Option(4096, min=1, help="largest max_tokens a request may ask for"),
    max_in_flight: int = typer.Option(256, min=1, help="requests in flight before 429"),
    max_batch: int = typer.Option(64, min=1, help="sequences decoded together (native engine)"),
    threads: int = typer.Option(
        None, min=1, help="torch threads of the native engine (default: torch's, or OMP_NUM_THREADS)"
    ),
    device: str = typer.Option("auto", help="native engine: cpu, cuda[:N] or auto (cuda when there is one)"),
    dtype: str = typer.Option(
        "auto", help="native engine weights and cache: float32, bfloat16, float16 or auto (bfloat16 on a GPU)"
    ),
    num_blocks: int = typer.Option(
        None, min=1, help="native engine cache blocks, staging rows included (default: max-batch sequences of up "
        "to 1024 tokens, plus one staging row each)"
    ),
    block_size: int = typer.Option(16, min=1, help="tokens per cache block (native engine)"),
    prefill_chunk: int = typer.Option(
        512, min=1, help="prompt tokens per sequence per prefill step (native engine; 4x this per step in all)"
    ),
    request_timeout: float = typer.Option(600.0, help="per-request timeout in seconds"),
    stats_interval: float = typer.Option(
        10.0, min=0.0, help="seconds between status lines (token rates, queue, cache) while busy; 0: none"
    ),
    staging: bool = typer.Option(
        None, "--staging/--no-staging", show_default=False,
        help="native engine: decode from dense rows allocated once inside the cache budget (the default on a "
        "CPU, where it is fastest); --no-staging decodes every request from the pool's blocks (the default on a "
        "GPU, where the sparse attention kernel reads them through the block tables)"),
    allow_unknown_fields: bool = typer.Option(
        False, help="accept (and ignore) request fields neither OpenAI nor vLLM documents, instead of a 400"
    ),
    engine_args: str = typer.Option(
        "", help='more arguments for --engine vllm|sglang, as one string (e.g. "--tensor-parallel-size 8")'
    ),
) -> None:
    """Serve a checkpoint over the OpenAI API (chat with thinking and tool calls, completions)."""
    import uvicorn

    from dsv.core.allocator import tune_cpu_allocator
    from dsv.core.errors import DSVError
    from dsv.serve.launch import (
        engine_command,
        free_port,
        load_native_app,
        load_proxy_app,
        start_engine,
        wait_ready,
    )

    if engine not in ("native", "vllm", "sglang"):
        fail(f"unknown engine `{engine}`; use --engine native, vllm or sglang", 2)
    if not request_timeout > 0:
        fail(f"--request-timeout must be positive, got {request_timeout}", 2)
    from dsv.core.cli import dtype_name, parse_dtype, resolve_device, resolve_dtype

    if engine == "native" and engine_args:
        fail("--engine-args only applies to --engine vllm or sglang", 2)
    try:
        extra = shlex.split(engine_args)
        if engine == "native":
            device = resolve_device(device)
            torch_dtype = resolve_dtype(dtype, device)
        else:  # the engine places the model itself; a dtype asked for is passed on
            torch_dtype = None if dtype == "auto" else parse_dtype(dtype)
    except ValueError as e:
        fail(str(e), 2)
    # Before the checkpoint loads (which can take minutes): the address must be free to listen on.
    try:
        _check_listen(host, port)
    except OSError as e:
        fail(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host", 2)
    settings = {"api_key": api_key or os.environ.get("DSV_API_KEY") or None, "max_tokens_limit": max_tokens_limit,
                "max_in_flight": max_in_flight, "request_timeout_s": request_timeout,
                "stats_interval_s": stats_interval, "allow_unknown_fields": allow_unknown_fields}  # fmt: skip
    proc = None
    tune_cpu_allocator()  # for the thread engine; the engine process sets its own
    try:
        if engine == "native":
            app = load_native_app(path_or_repo, model_name=model_name, max_model_len=max_model_len,
                                  max_batch=max_batch, threads=threads, device=device, dtype=torch_dtype,
                                  num_blocks=num_blocks, block_size=block_size, prefill_chunk=prefill_chunk,
                                  staging=staging, **settings)  # fmt: skip
        else:
            if not Path(path_or_repo).is_dir():
                fail(f"--engine {engine} needs a local checkpoint folder; `{path_or_repo}` is not one")
            inner = free_port()
            name = model_name or Path(path_or_repo.rstrip("/")).name
            asked = None if torch_dtype is None else dtype_name(torch_dtype)
            proc = start_engine(engine_command(engine, path_or_repo, host="127.0.0.1", port=inner, model_name=name,
                                               extra=extra, max_model_len=max_model_len, dtype=asked))  # fmt: skip
            wait_ready(f"http://127.0.0.1:{inner}/v1/models", proc)
            app = load_proxy_app(path_or_repo, f"http://127.0.0.1:{inner}", model_name=name,
                                 max_model_len=max_model_len, **settings)  # fmt: skip
    except FileNotFoundError as e:
        fail(f"{e}; check the checkpoint path or install the engine")
    except (DSVError, RuntimeError, TimeoutError, ValueError, OSError) as e:
        fail(str(e))
    where = f"native, {device}, {dtype_name(torch_dtype)}" if engine == "native" else engine
    if stats_interval > 0:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s dsv serve: %(message)s", "%H:%M:%S"))
        log = logging.getLogger("dsv.serve")
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal under the handler it found:
    # with the default one the process would die there and leave the engine process running.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    server = _server_class()(uvicorn.Config(app, host=host, port=port, log_level="warning"))  # type: ignore[arg-type]
    # Said once the socket listens and uvicorn handles Ctrl-C: a client (or a script waiting for the
    # line) may connect at once, and a Ctrl-C from then on shuts down gracefully.
    server.on_started = lambda: console.print(f"[green]dsv serve[/] on http://{host}:{port}/v1 ({where})")
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C it handled again once it has shut down
        server.received.append(signal.SIGINT)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    if signal.SIGINT in server.received:
        # uvicorn shut down gracefully on Ctrl-C (the engine process with it) and returned normally
        console.print("dsv serve: stopped (interrupted)")
        raise typer.Exit(ExitCode.INTERRUPTED)
    if not server.started:  # uvicorn logged why (e.g. the port was taken after the check)
        fail(f"the HTTP server could not start on {host}:{port}")


def _server_class() -> type:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, remembering the signals that stopped it (Ctrl-C must not exit 0)."""

        def __init__(self, config: uvicorn.Config) -> None:
            super().__init__(config)
            self.received: list[int] = []
            self.on_started: Callable[[], None] | None = None

        async def startup(self, sockets: list[Any] | None = None) -> None:
            await super().startup(sockets)
            if self.started and self.on_started is not None:
                self.on_started()

        def handle_exit(self, sig: int, frame: object) -> None:
            self.received.append(sig)
            super().handle_exit(sig, frame)  # type: ignore[arg-type]

    return Server


def _check_listen(host: str, port: int) -> None:
    """Bind ``host:port`` the way uvicorn will (address reuse on), then let it go."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
