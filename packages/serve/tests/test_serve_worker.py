"""The engine in its own process: same tokens as in-process, cancellation frees blocks, start-up
errors are reported, stop ends running requests, and the child does not outlive a killed server.

Run: ``pytest packages/serve/tests/test_serve_worker.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dsv.serve.app import ServerSettings
from dsv.serve.engine import Engine, Finish, GenParams, TokenEvent
from dsv.serve.worker import EngineProcess

# This environment's own command, never whichever `dsv` comes first on PATH.
DSV = [sys.executable, "-m", "dsv.cli.main"]


class _Collect:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.finish: Finish | None = None
        self.done = threading.Event()

    def __call__(self, ev: TokenEvent | Finish) -> None:
        if isinstance(ev, Finish):
            self.finish = ev
            self.done.set()
        else:
            self.tokens.append(ev.token)


@pytest.fixture(scope="module")
def engine_process(tiny_ckpt: Path) -> EngineProcess:
    proc = EngineProcess(tiny_ckpt, num_blocks=64, max_batch=8, threads=1)
    proc.start()
    yield proc
    proc.stop()
    assert not proc.alive


def _wait_idle(engine: EngineProcess) -> None:
    deadline = time.monotonic() + 60
    while engine.stats().used_blocks:
        assert time.monotonic() < deadline, "cache blocks were not given back"
        time.sleep(0.02)


def test_same_tokens_as_the_in_process_engine(tiny_ckpt: Path, engine_process: EngineProcess) -> None:
    from dsv.core.checkpoint import load_pretrained

    prompts = [[5, 17, 99, 300, 42], list(range(40, 90)), [7] * 20]
    params = GenParams(temperature=0.0, max_tokens=12)
    runs = [_Collect() for _ in prompts]
    for p, r in zip(prompts, runs, strict=True):
        engine_process.submit(p, params, r)
    model, _ = load_pretrained(tiny_ckpt)
    local = Engine.for_model(model.eval(), model.config, num_blocks=64, max_batch=8)
    local.start()
    try:
        for p, r in zip(prompts, runs, strict=True):
            want = _Collect()
            local.submit(p, params, want)
            assert want.done.wait(60) and r.done.wait(60)
            assert r.tokens == want.tokens and len(r.tokens) == 12
            assert r.finish is not None and r.finish.reason == "length" and r.finish.prompt_tokens == len(p)
    finally:
        local.stop()
    _wait_idle(engine_process)


def test_the_child_serves_in_the_asked_dtype(tiny_ckpt: Path) -> None:
    # bfloat16 weights and cache in the child: the same tokens as an in-process bfloat16 engine.
    from dsv.core.checkpoint import load_pretrained

    prompt, params = list(range(40, 90)), GenParams(temperature=0.0, max_tokens=12)
    proc = EngineProcess(tiny_ckpt, dtype=torch.bfloat16, num_blocks=16, max_batch=2, threads=1)
    proc.start()
    try:
        assert proc.dtype == "bfloat16"
        got = _Collect()
        proc.submit(prompt, params, got)
        model, _ = load_pretrained(tiny_ckpt, dtype=torch.bfloat16)
        local = Engine.for_model(model.eval(), model.config, num_blocks=16, max_batch=2, dtype=torch.bfloat16)
        assert local.pool.kv.dtype == torch.bfloat16
        local.start()
        want = _Collect()
        local.submit(prompt, params, want)
        assert want.done.wait(60) and got.done.wait(60)
        local.stop()
        assert got.tokens == want.tokens and len(got.tokens) == 12
    finally:
        proc.stop()


def test_the_child_runs_with_the_asked_threads(engine_process: EngineProcess) -> None:
    assert engine_process.threads == 1  # reported by the child once its model is loaded
    with pytest.raises(ValueError, match="threads must be at least 1"):
        EngineProcess(".", threads=0)


def test_deliver_hook_gets_one_batch_per_step(engine_process: EngineProcess) -> None:
    batches: list[int] = []
    engine_process.deliver = lambda batch: (batches.append(len(batch)), [cb(ev) for cb, ev in batch])
    try:
        runs = [_Collect() for _ in range(4)]
        for i, r in enumerate(runs):
            engine_process.submit([11 + i, 12, 13], GenParams(temperature=0.0, max_tokens=6), r)
        assert all(r.done.wait(60) for r in runs)
    finally:
        engine_process.deliver = None
    assert all(len(r.tokens) == 6 for r in runs)
    assert max(batches) > 1  # several streams' events arrive together


def test_cancel_frees_blocks_and_silences_the_request(engine_process: EngineProcess) -> None:
    r = _Collect()
    sid = engine_process.submit([3, 4, 5, 6], GenParams(temperature=0.0, max_tokens=400), r)
    deadline = time.monotonic() + 60
    while len(r.tokens) < 3:
        assert time.monotonic() < deadline, "no tokens"
        time.sleep(0.01)
    assert engine_process.stats().used_blocks > 0
    engine_process.cancel(sid)
    _wait_idle(engine_process)
    seen = len(r.tokens)
    # Events come back in order over one pipe: once a later request has run to its end, any token
    # the cancelled one was still given would have arrived before that request's finish.
    later = _Collect()
    engine_process.submit([7, 8, 9], GenParams(temperature=0.0, max_tokens=8), later)
    assert later.done.wait(60) and len(later.tokens) == 8
    assert len(r.tokens) == seen and r.finish is None


def test_requests_that_cannot_fit_are_refused_in_the_server(engine_process: EngineProcess) -> None:
    with pytest.raises(ValueError, match="empty prompt"):
        engine_process.submit([], GenParams(), _Collect())
    with pytest.raises(ValueError, match="more cache blocks"):
        engine_process.submit([1] * 10, GenParams(max_tokens=64 * 16), _Collect())


def test_a_broken_checkpoint_is_reported_at_start(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v32"}')
    engine = EngineProcess(tmp_path, num_blocks=8)
    with pytest.raises(RuntimeError, match="could not start"):
        engine.start()
    assert not engine.alive


def test_stop_ends_running_requests(tiny_ckpt: Path) -> None:
    engine = EngineProcess(tiny_ckpt, num_blocks=64)
    engine.start()
    r = _Collect()
    engine.submit([9, 8, 7], GenParams(temperature=0.0, max_tokens=500), r)
    deadline = time.monotonic() + 60
    while not r.tokens:
        assert time.monotonic() < deadline, "no tokens"
        time.sleep(0.01)
    engine.stop()
    assert r.done.is_set() and r.finish is not None and r.finish.reason == "error"
    assert not engine.alive
    with pytest.raises(RuntimeError, match="stopped"):
        engine.submit([1, 2], GenParams(), _Collect())


_ORPHAN = """
import sys, time
from dsv.serve.worker import EngineProcess
if __name__ == "__main__":
    e = EngineProcess(sys.argv[1], num_blocks=16)
    e.start()
    print(e._proc.pid, flush=True)
    time.sleep(600)
"""


def test_the_engine_process_exits_when_the_server_is_killed(tiny_ckpt: Path, tmp_path: Path) -> None:
    script = tmp_path / "server.py"
    script.write_text(_ORPHAN)
    server = subprocess.Popen(
        [sys.executable, str(script), str(tiny_ckpt)], stdout=subprocess.PIPE, text=True
    )
    try:
        child = int(server.stdout.readline())  # type: ignore[union-attr]
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _running(child):
            assert time.monotonic() < deadline, "the engine process outlived its server"
            time.sleep(0.1)
    finally:
        if server.poll() is None:
            server.kill()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init in a container) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("config", [None, '{"model_type": "deepseek_v32", "bogus": 1}'])
def test_dsv_serve_names_a_bad_checkpoint_without_a_traceback(
    tmp_path: Path, config: str | None, reserve_port: Callable[[], int]
) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(config)
    for target, want in (
        (tmp_path / "missing", "no such folder"),
        (folder, "bogus" if config else "no config.json"),
    ):
        done = subprocess.run([*DSV, "serve", str(target), "--port", str(reserve_port())], capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert done.returncode == 1
        assert want in done.stderr and "Traceback" not in done.stderr


def test_dsv_serve_refuses_bad_settings_before_loading(tmp_path: Path) -> None:
    import socket

    missing = str(tmp_path / "missing")  # never reached: each case fails on its setting first
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for args, want in (
            (["--port", port], f"cannot listen on 127.0.0.1:{port}"),
            (["--request-timeout", "0"], "--request-timeout must be positive"),
            (["--max-batch", "0"], "--max-batch"),
            (["--max-in-flight", "0"], "--max-in-flight"),
            (["--dtype", "fp7"], "unknown dtype"),
            (["--engine-args", "--tp 8"], "--engine-args only applies"),
            (["--engine", "vllm", "--engine-args", "--x 'unclosed"], "quotation"),
            (["--device", "tpu"], "unknown device"),
            *([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA device")]),
        ):
            done = subprocess.run([*DSV, "serve", missing, *args], capture_output=True, text=True, timeout=60)
            assert done.returncode == 2, (args, done.stderr)
            assert want in done.stderr and "Traceback" not in done.stderr


def test_engine_and_settings_reject_sizes_below_one() -> None:
    model = torch.nn.Linear(1, 1)
    for name in ("num_blocks", "block_size", "max_batch", "prefill_chunk", "prefill_budget"):
        with pytest.raises(ValueError, match=name):
            Engine(model, num_layers=1, kv_dim=4, index_dim=None, **{name: 0})
    for bad in ({"max_in_flight": 0}, {"max_tokens_limit": -1}, {"request_timeout_s": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServerSettings(model_name="m", **bad)


def test_max_model_len_beyond_the_models_positions_is_refused(tiny_ckpt: Path) -> None:
    from dsv.serve import load_native_app

    with pytest.raises(ValueError, match="max_position_embeddings"):
        load_native_app(str(tiny_ckpt), max_model_len=10**6)


def test_bad_server_settings_are_refused_before_the_engine_starts(
    tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dsv.serve import load_native_app

    started: list[object] = []
    monkeypatch.setattr(EngineProcess, "start", lambda self: started.append(self))
    with pytest.raises(ValueError, match="max_in_flight"):
        load_native_app(str(tiny_ckpt), max_in_flight=0)
    # A cache too small for one request of the full context: the API would accept requests the
    # engine must refuse (they used to end in a 500 or a cut stream).
    with pytest.raises(ValueError, match="raise --num-blocks"):
        load_native_app(str(tiny_ckpt), max_model_len=1024, num_blocks=4, block_size=16)
    assert started == [], "no engine process was started for a server that cannot exist"
