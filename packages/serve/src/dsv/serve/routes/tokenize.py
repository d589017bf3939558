"""``/tokenize`` and ``/detokenize`` as vLLM has them; chat messages are encoded exactly as the
chat endpoint encodes them, so ``count`` equals its ``usage.prompt_tokens``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from dsv.serve.schemas import DetokenizeRequest, TokenizeRequest
from dsv.serve.state import ServerState

router = APIRouter()


@router.post("/tokenize")
async def tokenize(request: Request) -> dict[str, Any]:
    """Token ids of a prompt, or of chat messages encoded as the chat endpoint encodes them."""
    srv: ServerState = request.app.state.server
    req: TokenizeRequest = await srv.read_json(request, TokenizeRequest)
    alias = srv.resolve_model(req.model) if req.model is not None else None
    text = req.prompt
    if req.messages is not None:
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []] or None
        text = srv.chat_text(req, srv.thinking_mode(req, alias), tools)
    ids = srv.backend.encode(text or "")
    return {"tokens": ids, "count": len(ids), "max_model_len": srv.backend.max_model_len}


@router.post("/detokenize")
async def detokenize(request: Request) -> dict[str, Any]:
    srv: ServerState = request.app.state.server
    req: DetokenizeRequest = await srv.read_json(request, DetokenizeRequest)
    if req.model is not None:
        srv.resolve_model(req.model)
    srv.check_token_ids("tokens", req.tokens)
    return {"prompt": srv.backend.decode(req.tokens)}
