"""Load test: 64 concurrent streaming clients against a real ``dsv serve`` process on 127.0.0.1.

Two waves of 64 chat streams (httpx, asyncio) on the random tiny checkpoint; in each wave a quarter
of the clients hang up mid-stream. Checked: no 5xx, every stream that ran to the end is well formed
(each event parses, a ``finish_reason`` is set, ``[DONE]`` closes it), the engine's cache blocks
and in-flight count return to their idle values after each wave, and the server's resident memory
after the second wave stays within a bound of the first (a leak per request would grow it).

Run: ``pytest packages/serve/tests/test_serve_load.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow

CLIENTS = 64


@pytest.fixture
def server(tiny_ckpt: Path, reserve_port: Callable[[], int]) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = reserve_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two shared cores: see conftest
    cmd = [sys.executable, "-m", "dsv.cli.main", "serve", str(tiny_ckpt), "--port", str(port), "--model-name", "m", "--max-model-len", "512"]
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, f"dsv serve exited with {proc.returncode}"
            assert time.monotonic() < deadline, "dsv serve did not come up"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield proc, url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def _client(http: httpx.AsyncClient, i: int, wave: int) -> dict[str, Any]:
    """One streaming chat; clients with i % 4 == 3 hang up after a few events."""
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": f"client {i} of wave {wave}: plan a trip"}],
        "max_tokens": 12 + (i * 7) % 29,
        "temperature": 1.0,
        "seed": 1000 * wave + i,
        "stream": True,
    }
    hang_up = i % 4 == 3
    events: list[Any] = []
    async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            return {"status": resp.status_code, "events": [], "hung_up": hang_up}
        async for line in resp.aiter_lines():
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
            if hang_up and len(events) >= 3:
                break  # leaving the block closes the connection mid-stream
    return {"status": resp.status_code, "events": events, "hung_up": hang_up}


async def _wave(url: str, wave: int) -> list[dict[str, Any]]:
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        return await asyncio.gather(*(_client(http, i, wave) for i in range(CLIENTS)))


def _wait_idle(url: str, idle: dict[str, Any]) -> None:
    deadline = time.monotonic() + 120  # generous: the host may be busy with other tests
    while True:
        h = httpx.get(url + "/health", timeout=30).json()
        metrics = httpx.get(url + "/metrics", timeout=30).text
        in_flight = next(
            float(x.split()[-1]) for x in metrics.splitlines() if x.startswith("dsv_requests_in_flight ")
        )
        now = (h["num_blocks"] - h["used_blocks"], h["running"], h["waiting"], in_flight)
        if now == (idle["num_blocks"] - idle["used_blocks"], 0, 0, 0.0):
            return
        assert time.monotonic() < deadline, f"server not back to idle: {h}, in flight {in_flight}"
        time.sleep(0.05)


def test_64_streaming_clients_two_waves(server: tuple[subprocess.Popen[bytes], str]) -> None:
    proc, url = server
    idle = httpx.get(url + "/health").json()
    assert idle["used_blocks"] == 0
    rss = []
    for wave in (1, 2):
        results = asyncio.run(_wave(url, wave))
        assert [r["status"] for r in results] == [200] * CLIENTS, "no 5xx (nor any other refusal)"
        finished = [r for r in results if not r["hung_up"]]
        assert len(finished) == CLIENTS * 3 // 4
        for r in finished:
            events = r["events"]
            assert events[-1] == "[DONE]" and all(isinstance(e, dict) for e in events[:-1])
            chunks = [e for e in events[:-1] if e["choices"]]
            assert all(e["object"] == "chat.completion.chunk" for e in chunks)
            assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
            assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
        _wait_idle(url, idle)
        assert proc.poll() is None
        rss.append(_rss_kib(proc.pid))
    # Every choice is counted once, by how it ended. A hung-up client's choice is cancelled unless
    # it finished before the server noticed the closed connection.
    metrics = httpx.get(url + "/metrics", timeout=30).text
    ended = {
        x.split('"')[1]: float(x.split()[-1])
        for x in metrics.splitlines()
        if x.startswith("dsv_finished_choices_total{")
    }
    assert sum(ended.values()) == 2 * CLIENTS and "error" not in ended, ended
    assert 0 < ended.get("cancelled", 0) <= 2 * (CLIENTS - CLIENTS * 3 // 4), ended
    growth = rss[1] - rss[0]
    print("rss KiB after waves", rss)
    assert growth < max(32 * 1024, rss[0] // 10), f"RSS grew {growth} KiB between waves ({rss})"
