"""``/health`` and ``/metrics``: what load balancers and monitoring poll (no API key needed)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from dsv.serve.state import ServerState

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    srv: ServerState = request.app.state.server
    # stats() may be a round trip to the engine process: off the loop that streams tokens.
    return {"status": "draining" if srv.draining else "ok", **await asyncio.to_thread(srv.backend.stats)}


@router.get("/metrics")
async def prom(request: Request) -> PlainTextResponse:
    srv: ServerState = request.app.state.server
    now = time.monotonic()
    recent = [n for t, n in srv.tps_window if now - t <= 10.0]
    srv.metrics.tokens_per_s.set(sum(recent) / 10.0)
    srv.metrics.in_flight.set(srv.in_flight)
    return PlainTextResponse(await asyncio.to_thread(srv.metrics.render), media_type="text/plain; version=0.0.4")
