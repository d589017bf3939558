"""The HTTP routes, one module per endpoint family; each exposes ``router`` (a FastAPI
``APIRouter``) and reads the server's :class:`~dsv.serve.state.ServerState` from
``request.app.state.server``. A new endpoint is a new module here, listed in :data:`ROUTERS`.

- :mod:`.monitoring`: ``/health``, ``/metrics`` (open without the API key)
- :mod:`.models`: ``/v1/models``, ``/v1/models/{id}``
- :mod:`.tokenize`: ``/tokenize``, ``/detokenize`` (as vLLM has them)
- :mod:`.tokenizer_info`: ``/tokenizer_info`` (vLLM's; lm-eval tokenizes through the server with it)
- :mod:`.chat`: ``/v1/chat/completions``
- :mod:`.completions`: ``/v1/completions``
- :mod:`.responses`: ``/v1/responses`` (OpenAI's Responses API on the chat path)
"""

from __future__ import annotations

from fastapi import APIRouter, Request

__all__ = ["ROUTERS", "server"]


def server(request: Request) -> object:
    """The :class:`~dsv.serve.state.ServerState` of the app serving ``request``."""
    return request.app.state.server


def _routers() -> list[APIRouter]:
    from dsv.serve.routes import chat, completions, models, monitoring, responses, tokenize, tokenizer_info

    return [monitoring.router, models.router, tokenize.router, tokenizer_info.router, chat.router,
            completions.router, responses.router]  # fmt: skip


ROUTERS = _routers
