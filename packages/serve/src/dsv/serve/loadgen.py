"""A cheap load generator for ``dsv bench serve``: C concurrent streaming ``/v1/completions`` clients.

It runs in its own process (the benchmark starts it per wave) so parsing streams never competes
with the benchmark's own Python for the GIL, and it keeps per-event work to a minimum: raw asyncio
sockets with HTTP/1.1 and ``Connection: close``, no HTTP client library, no JSON decoding of token
events. Per request it records the time to the first ``data:`` event and reads the completion
token count from the final usage event; a status other than 200 or an error event fails the wave.

Run: ``python -m dsv.serve.loadgen http://127.0.0.1:PORT prompts.json MAX_TOKENS`` (``prompts.json``
is a JSON list of token-id lists); prints one JSON object: ``tok_s``, ``ttft_p50``, ``ttft_p99``,
``tokens``, ``wall_s``.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["percentile", "run_wave"]

_USAGE = re.compile(rb'"completion_tokens":\s*(\d+)')


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 1]) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def _one(host: str, port: int, prompt: list[int], max_tokens: int, model: str) -> tuple[float, int]:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()  # fmt: skip
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(head + body)
    buf = bytearray()
    ttft = None
    body_at = -1
    try:
        while data := await reader.read(1 << 16):
            start = len(buf)
            buf += data
            if body_at < 0:
                body_at = buf.find(b"\r\n\r\n")
                if body_at < 0:
                    continue
            if ttft is None and buf.find(b"data: ", max(body_at, start - 6)) >= 0:
                ttft = time.perf_counter() - t0
    finally:
        writer.close()
    status = bytes(buf[: buf.find(b"\r\n")])
    if b" 200 " not in status + b" ":
        raise RuntimeError(f"server answered {status.decode(errors='replace')}: {bytes(buf[-300:])!r}")
    if b'"error"' in buf:
        raise RuntimeError(f"error event in the stream: {bytes(buf[-500:])!r}")
    usage = _USAGE.findall(buf)
    if ttft is None or not usage or b"data: [DONE]" not in buf:
        raise RuntimeError(f"incomplete stream: {bytes(buf[-300:])!r}")
    return ttft, int(usage[-1])


async def _wave(url: str, prompts: list[list[int]], max_tokens: int, model: str) -> dict[str, float]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    t0 = time.perf_counter()
    out = await asyncio.gather(*(_one(host, port, p, max_tokens, model) for p in prompts))
    wall = time.perf_counter() - t0
    ttfts = [t for t, _ in out]
    tokens = sum(n for _, n in out)
    return {"tok_s": tokens / wall, "ttft_p50": percentile(ttfts, 0.5), "ttft_p99": percentile(ttfts, 0.99),
            "tokens": tokens, "wall_s": wall}  # fmt: skip


def run_wave(url: str, prompts: list[list[int]], max_tokens: int, model: str = "m") -> dict[str, float]:
    """One wave: every prompt sent at once, each on its own connection; tokens/s over the wave."""
    return asyncio.run(_wave(url, prompts, max_tokens, model))


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print("usage: python -m dsv.serve.loadgen URL PROMPTS_JSON MAX_TOKENS [MODEL]", file=sys.stderr)
        return 2
    prompts = json.loads(Path(argv[1]).read_text())
    print(json.dumps(run_wave(argv[0], prompts, int(argv[2]), *(argv[3:]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
