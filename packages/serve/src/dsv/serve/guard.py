"""The guard in front of every route: the API key and the declared body size (a plain ASGI
middleware), and the mapping of every error to the OpenAI shape (:func:`install_error_handlers`).

Admission (429 when full, 503 while draining) and the body's own checks are
:class:`~dsv.serve.state.ServerState`'s, since they need the parsed request.

Run the checks: ``pytest packages/serve/tests/test_serve_openai.py packages/serve/tests/test_serve_fuzz.py``.
"""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv.serve.metrics import Metrics
from dsv.serve.schemas import APIError, error_body
from dsv.serve.state import ServerSettings

__all__ = ["Guard", "install_error_handlers"]

# Reachable without the API key: what load balancers and monitoring poll.
_OPEN_PATHS = frozenset({"/health", "/metrics"})


class Guard:
    """API key and declared body size, checked before routing (plain ASGI).

    A pure ASGI middleware rather than ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware``
    pipes every streamed chunk through an extra task and memory stream, which costs a loop hop per
    server-sent event.
    """

    def __init__(self, app: Any, settings: ServerSettings, metrics: Metrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics
        self.expected = f"Bearer {settings.api_key}".encode() if settings.api_key else b""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            problem = None
            auth = headers.get(b"authorization", b"")
            if (
                self.expected
                and scope["path"] not in _OPEN_PATHS
                and not secrets.compare_digest(auth, self.expected)
            ):
                problem = APIError(
                    401, "invalid or missing API key", type="authentication_error", code="invalid_api_key"
                )
            length = headers.get(b"content-length", b"")
            if problem is None and length.isdigit() and int(length) > self.settings.max_request_bytes:
                problem = APIError(
                    413,
                    f"request body over {self.settings.max_request_bytes} bytes",
                    code="request_too_large",
                )
            if problem is not None:
                self.metrics.errors.labels(str(problem.status)).inc()
                response = JSONResponse(problem.body(), status_code=problem.status, headers=problem.headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Every error leaves in the OpenAI shape and is counted by status; an unexpected exception is
    a 500 naming only its type."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        metrics.errors.labels(str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        metrics.errors.labels(str(e.status_code)).inc()
        return JSONResponse(error_body(str(e.detail), kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        metrics.errors.labels("500").inc()
        return JSONResponse(
            error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500
        )
