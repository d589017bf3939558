"""The serving engine in its own process, so model work never competes with HTTP for the GIL.

A small model's forward is hundreds of short torch ops; each one releases the GIL and takes it
back, and in a single-process server the asyncio loop (request parsing, SSE writes) grabs it in
between, so the engine and the HTTP layer mostly take turns. :class:`EngineProcess` starts a
spawned child that loads the checkpoint and runs an :class:`~dsv.serve.engine.Engine`, and offers
the engine's client API in the server process (``submit``, ``cancel``, ``stats``, ``stop`` and the
per-step ``deliver`` hook), so :class:`~dsv.serve.backend.LocalBackend` works with either.

Protocol: pickled tuples over two pipes. Server -> engine: ``("submit", sid, prompt, params)``,
``("cancel", sid)``, ``("stats", ticket)``, ``("stop",)``. Engine -> server: ``("ready", info)`` or
``("error", message)`` once at start, then ``("events", [(sid, event), ...])`` once per engine step,
``("stats", ticket, EngineStats)`` and finally ``("stopped",)``. The child stops by itself when the
server process goes away (its command pipe closes).

Run the checks: ``pytest packages/serve/tests/test_serve_worker.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsv.serve.engine import EngineStats, Event, Finish, GenParams

__all__ = ["EngineProcess"]


class _Tag:
    """The child-side callback of one request: only its server-side id matters."""

    __slots__ = ("sid",)

    def __init__(self, sid: int) -> None:
        self.sid = sid

    def __call__(self, ev: Event) -> None:  # pragma: no cover - the child always installs deliver
        raise RuntimeError("events are delivered in batches")


def _child_main(
    folder: str,
    engine_kwargs: dict[str, Any],
    device: str,
    dtype: Any,
    threads: int | None,
    cmd: Any,
    evt: Any,
) -> None:
    from dsv.core.allocator import tune_cpu_allocator

    # Ctrl-C in a terminal reaches the whole process group: the server stops this process through
    # the pipe (or it sees the pipe close), so the key press must not end it with a traceback first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tune_cpu_allocator()  # before the model's tensors exist; this process is the engine's alone
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    from dsv.core.checkpoint import load_pretrained
    from dsv.core.cli import dtype_name
    from dsv.serve.engine import Engine

    lock = threading.Lock()

    def send(msg: tuple[Any, ...]) -> None:
        with lock:
            evt.send(msg)

    try:
        dtype = dtype or torch.float32
        model, tokenizer = load_pretrained(folder, device=device, dtype=dtype, with_tokenizer=True)
        engine = Engine.for_model(model.eval(), model.config, device=device, dtype=dtype, tokenizer=tokenizer,
                                  **engine_kwargs)  # fmt: skip
    except Exception as e:  # reported to the server, which raises it to the user
        send(("error", f"{type(e).__name__}: {e}"))
        return
    ids: dict[int, int] = {}  # server sid -> engine id, while the request runs

    def deliver(batch: list[tuple[Any, Event]]) -> None:
        out = [(cb.sid, ev) for cb, ev in batch]
        for sid, ev in out:
            if isinstance(ev, Finish):
                ids.pop(sid, None)
        send(("events", out))

    engine.deliver = deliver
    engine.start()
    info = {"num_blocks": engine.pool.num_blocks, "block_size": engine.pool.block_size,
            "threads": torch.get_num_threads(), "dtype": dtype_name(dtype)}  # fmt: skip
    send(("ready", info))
    while True:
        try:
            msg = cmd.recv()
        except (EOFError, OSError):  # the server process is gone
            msg = ("stop",)
        kind = msg[0]
        if kind == "submit":
            _, sid, prompt, params = msg
            try:
                ids[sid] = engine.submit(prompt, params, _Tag(sid))
            except ValueError as e:  # the server validates first; this is a last line of defence
                send(("events", [(sid, Finish("error", len(prompt), 0, str(e)))]))
        elif kind == "cancel":
            eid = ids.pop(msg[1], None)
            if eid is not None:
                engine.cancel(eid)
        elif kind == "stats":
            send(("stats", msg[1], engine.stats()))
        elif kind == "stop":
            engine.stop()  # running requests end with an error event, flushed through deliver
            send(("stopped",))
            return


class EngineProcess:
    """An :class:`~dsv.serve.engine.Engine` running in a spawned child process.

    ``engine_kwargs`` go to ``Engine.for_model`` in the child (``num_blocks``, ``max_batch``...);
    ``threads`` sets the child's torch threads (default: torch's own choice, which follows
    ``OMP_NUM_THREADS``); :attr:`threads` reports what the child runs with once started. ``dtype``
    (a ``torch.dtype``; default float32) is the weights' and the cache's; :attr:`dtype` names it
    once started.
    Events reach each request's callback through ``deliver`` (one call per engine step, from a
    reader thread) or, without it, one callback call per event.
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        device: str = "cpu",
        dtype: Any = None,
        threads: int | None = None,
        start_timeout: float = 300.0,
        **engine_kwargs: Any,
    ) -> None:
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.folder, self.device, self.start_timeout = str(folder), device, start_timeout
        self._dtype = dtype
        self.dtype = ""  # the child's dtype name, once started
        self.threads = threads
        self.engine_kwargs = engine_kwargs
        self.deliver: Callable[[list[tuple[Callable[[Event], None], Event]]], None] | None = None
        self.num_blocks = 0
        self.block_size = 1
        self._callbacks: dict[int, Callable[[Event], None]] = {}
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        self._tickets = itertools.count()
        self._pending: dict[int, tuple[threading.Event, list[EngineStats]]] = {}
        self._last_stats = EngineStats()
        self._stopped = threading.Event()
        self._proc: Any = None
        self._reader: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Spawn the child and wait until its model is loaded; raises ``RuntimeError`` when it fails."""
        ctx = mp.get_context("spawn")  # no fork of a process that may hold torch threads
        self._cmd, cmd_child = ctx.Pipe(duplex=False)[::-1]
        evt_parent, evt_child = ctx.Pipe(duplex=False)
        self._evt = evt_parent
        self._proc = ctx.Process(
            target=_child_main,
            args=(
                self.folder,
                self.engine_kwargs,
                self.device,
                self._dtype,
                self.threads,
                cmd_child,
                evt_child,
            ),
            name="dsv-engine",
            daemon=True,
        )
        self._proc.start()
        cmd_child.close()
        evt_child.close()
        if not self._evt.poll(self.start_timeout):
            self._proc.kill()
            raise RuntimeError(f"the engine process did not load the model in {self.start_timeout:.0f} s")
        try:
            msg = self._evt.recv()
        except EOFError:
            self._proc.join(timeout=5)
            raise RuntimeError(f"the engine process exited with code {self._proc.exitcode}") from None
        if msg[0] == "error":
            # The child exits right after its message; on a loaded host tearing down torch takes a while.
            self._proc.join(timeout=30)
            raise RuntimeError(f"the engine process could not start: {msg[1]}")
        self.num_blocks, self.block_size = msg[1]["num_blocks"], msg[1]["block_size"]
        self.threads, self.dtype = msg[1]["threads"], msg[1]["dtype"]
        self._reader = threading.Thread(target=self._read, name="dsv-engine-reader", daemon=True)
        self._reader.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Let running requests end (error event), then wait for the child; kill it if it hangs."""
        if self._proc is None:
            return
        if self._proc.is_alive():
            with contextlib.suppress(OSError, ValueError):
                self._send(("stop",))
            self._stopped.wait(timeout)
            self._proc.join(timeout=timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5)
        if self._reader is not None:
            self._reader.join(timeout=5)

    @property
    def alive(self) -> bool:
        """Whether the engine process is running."""
        return self._proc is not None and self._proc.is_alive()

    # ----------------------------------------------------------------- client API (any thread)
    def blocks_needed(self, prompt_len: int, max_tokens: int) -> int:
        return -(-(prompt_len + max_tokens) // self.block_size)

    def submit(self, prompt: list[int], params: GenParams, on_event: Callable[[Event], None]) -> int:
        """Queue a request (same contract as :meth:`Engine.submit`). Returns its id."""
        if not prompt:
            raise ValueError("empty prompt")
        if self.blocks_needed(len(prompt), params.max_tokens) > self.num_blocks:
            raise ValueError("request needs more cache blocks than the pool holds")
        if self._stopped.is_set():
            raise RuntimeError("the engine process has stopped")
        sid = next(self._ids)
        self._callbacks[sid] = on_event
        self._send(("submit", sid, list(prompt), params))
        return sid

    def cancel(self, seq_id: int) -> None:
        """Stop a request; no more events reach its callback."""
        if self._callbacks.pop(seq_id, None) is not None and not self._stopped.is_set():
            with contextlib.suppress(OSError, ValueError):
                self._send(("cancel", seq_id))

    def stats(self, timeout: float = 5.0) -> EngineStats:
        """The engine's counters, asked of the child (the last known ones if it does not answer)."""
        if self._stopped.is_set() or not self.alive:
            return self._last_stats
        ticket = next(self._tickets)
        waiter: tuple[threading.Event, list[EngineStats]] = (threading.Event(), [])
        self._pending[ticket] = waiter
        try:
            self._send(("stats", ticket))
            waiter[0].wait(timeout)
        except (OSError, ValueError):
            pass
        finally:
            self._pending.pop(ticket, None)
        return waiter[1][0] if waiter[1] else self._last_stats

    # ----------------------------------------------------------------- internals
    def _send(self, msg: tuple[Any, ...]) -> None:
        with self._send_lock:
            self._cmd.send(msg)

    def _read(self) -> None:
        while True:
            try:
                msg = self._evt.recv()
            except (EOFError, OSError):
                break
            kind = msg[0]
            if kind == "events":
                batch = []
                for sid, ev in msg[1]:
                    cb = (
                        self._callbacks.pop(sid, None) if isinstance(ev, Finish) else self._callbacks.get(sid)
                    )
                    if cb is not None:
                        batch.append((cb, ev))
                if self.deliver is not None:
                    self.deliver(batch)
                else:
                    for cb, ev in batch:
                        cb(ev)
            elif kind == "stats":
                self._last_stats = msg[2]
                waiter = self._pending.get(msg[1])
                if waiter is not None:
                    waiter[1].append(msg[2])
                    waiter[0].set()
            elif kind == "stopped":
                break
        self._stopped.set()
        # Requests still waiting get an end: the process is gone.
        leftover, self._callbacks = self._callbacks, {}
        batch = [(cb, Finish("error", 0, 0, "the engine process stopped")) for cb in leftover.values()]
        if batch and self.deliver is not None:
            self.deliver(batch)
        else:
            for cb, ev in batch:
                cb(ev)
