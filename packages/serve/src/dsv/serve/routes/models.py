"""``/v1/models`` and ``/v1/models/{id}``: the served name and its ``-reasoner`` alias (thinking on)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from dsv.serve.state import ServerState

router = APIRouter()


def _card(srv: ServerState, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "dsv", "max_model_len": srv.backend.max_model_len}


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    srv: ServerState = request.app.state.server
    names = [srv.settings.model_name, f"{srv.settings.model_name}-reasoner"]
    return {"object": "list", "data": [_card(srv, n) for n in names]}


@router.get("/v1/models/{name}")
async def model(name: str, request: Request) -> dict[str, Any]:
    srv: ServerState = request.app.state.server
    srv.resolve_model(name)  # 404 in the OpenAI shape for any other name
    return _card(srv, name)
