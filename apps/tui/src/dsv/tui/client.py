"""The chat endpoint as `dsv chat` uses it: the official ``openai`` AsyncOpenAI client, streaming.

`ChatClient.stream(messages, tools=..., thinking=...)` sends one streaming chat-completions request
and yields ``("open", "")`` once the response headers are in, ``("reasoning", text)`` and
``("content", text)`` pieces as they arrive, then one
`StreamEnd` with the assembled tool calls, the usage (``stream_options.include_usage``) and the
finish reason. Reasoning is read from ``reasoning_content`` (DeepSeek's API, dsv serve) or
``reasoning`` (newer vLLM).

The thinking switch goes out both ways at once, in ``extra_body``: DeepSeek's
``thinking: {"type": "enabled" | "disabled"}`` (which dsv serve reads too) and vLLM's
``chat_template_kwargs: {"thinking": bool}``; each server ignores the one it does not know.

Every failure becomes a `ClientError` whose ``kind`` is one of `dsv.tui.events.AgentError`'s:
``connect`` (nothing answers, or no headers in time), ``auth`` (401/403), ``rate_limit`` (429, with
the server's Retry-After), ``server`` (5xx, or a 4xx that names what the server refused),
``stream`` (the stream broke off, stalled past ``read_timeout_s`` or did not parse). The openai
client's own retries are off: the shell shows the error and offers the retry itself.
"""

from __future__ import annotations

import email.utils
import functools
import importlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from dsv.tui.events import Usage

__all__ = ["ChatClient", "ClientError", "StreamEnd", "usage_from"]


class ClientError(Exception):
    """A request failed; ``kind``/``retry_after_s``/``retryable`` as in `dsv.tui.events.AgentError`."""

    def __init__(
        self, kind: str, message: str, *, retry_after_s: float | None = None, retryable: bool = False
    ):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after_s = retry_after_s
        self.retryable = retryable


@dataclass
class StreamEnd:
    """The end of one streamed response."""

    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI message shape
    usage: Usage | None = None
    finish_reason: str = "stop"
    model: str = ""


def usage_from(raw: Any) -> Usage | None:
    """`Usage` from an OpenAI ``usage`` object (or dict); reasoning and cached counts when given."""
    if raw is None:
        return None
    get = raw.get if isinstance(raw, dict) else lambda k, d=None: getattr(raw, k, d)
    details = get("completion_tokens_details")
    prompt_details = get("prompt_tokens_details")

    def sub(obj: Any, key: str) -> int | None:
        if obj is None:
            return None
        v = obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)
        return None if v is None else int(v)

    cached = sub(prompt_details, "cached_tokens")
    if cached is None and get("prompt_cache_hit_tokens") is not None:  # DeepSeek's spelling
        cached = int(get("prompt_cache_hit_tokens"))
    return Usage(
        prompt_tokens=int(get("prompt_tokens") or 0),
        completion_tokens=int(get("completion_tokens") or 0),
        reasoning_tokens=sub(details, "reasoning_tokens"),
        cached_tokens=cached,
    )


@functools.cache
def _transport_errors() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(timeout, any HTTP) exception classes of the HTTP libraries the openai client may run on:
    httpx, or httpx2 in openai 3.x; errors while a stream is read come through unwrapped."""
    mods = []
    for name in ("httpx", "httpx2"):
        try:
            mods.append(importlib.import_module(name))
        except ImportError:
            continue
    return tuple(m.TimeoutException for m in mods), tuple(m.HTTPError for m in mods)


def _retry_after(headers: Any) -> float | None:
    if headers is None:
        return None
    if ms := headers.get("retry-after-ms"):
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value) if value else None
        return None if when is None else max(0.0, when.timestamp() - time.time())


def _server_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if body.get("message"):
            return str(body["message"])
    return str(getattr(exc, "message", "") or exc)


class ChatClient:
    """One OpenAI-compatible endpoint (``base_url`` ends in ``/v1``) and model."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        model: str = "",
        *,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 120.0,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or ""
        self.model = model
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.read_timeout_s = read_timeout_s
        from openai import Timeout

        self.timeout = Timeout(read_timeout_s, connect=connect_timeout_s)
        self._client_and_loop: tuple[Any, Any] | None = None
        self.tokenize_supported: bool | None = None  # learned on the first `tokenize`

    @property
    def _client(self) -> Any:
        """The AsyncOpenAI client of the running event loop: its connection pool belongs to the loop
        it was first used on, so another loop (a second ``asyncio.run``) gets a client of its own."""
        import asyncio

        from openai import AsyncOpenAI

        loop = asyncio.get_running_loop()
        if self._client_and_loop is None or self._client_and_loop[1] is not loop:
            # An empty key would make the openai client refuse to start; servers without auth ignore it.
            client = AsyncOpenAI(base_url=self.base_url, api_key=self.api_key or "none", timeout=self.timeout,
                                 max_retries=0)  # fmt: skip
            self._client_and_loop = (client, loop)
        return self._client_and_loop[0]

    @property
    def server_root(self) -> str:
        """The endpoint without its ``/v1`` (where dsv serve and vLLM answer ``/tokenize``)."""
        return self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url

    @staticmethod
    def thinking_body(thinking: bool) -> dict[str, Any]:
        """The thinking switch in both dialects (see the module docstring)."""
        return {
            "thinking": {"type": "enabled" if thinking else "disabled"},
            "chat_template_kwargs": {"thinking": thinking},
        }

    def request_body(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None, thinking: bool
    ) -> dict[str, Any]:
        """The JSON body `stream` sends (what a test sees on the wire)."""
        body: dict[str, Any] = {"model": self.model, "messages": messages, "stream": True,
                                "stream_options": {"include_usage": True}}  # fmt: skip
        if tools:
            body["tools"] = tools
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            body["temperature"] = self.temperature
        return {**body, **self.thinking_body(thinking)}

    async def list_models(self) -> list[str]:
        """The model ids the endpoint serves."""
        try:
            page = await self._client.models.list()
        except Exception as exc:
            raise self._map(exc) from None
        return [m.id for m in page.data]

    async def stream(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        thinking: bool = True,
    ) -> AsyncIterator[tuple[str, str] | StreamEnd]:
        """Stream one response (see the module docstring); raises `ClientError`."""
        body = self.request_body(messages, tools=tools, thinking=thinking)
        extra = {k: body.pop(k) for k in ("thinking", "chat_template_kwargs")}
        try:
            stream = await self._client.chat.completions.create(**body, extra_body=extra)
        except Exception as exc:
            raise self._map(exc) from None
        yield ("open", "")  # headers are in: the server has the request (prefill may still take a while)
        calls: dict[int, dict[str, Any]] = {}
        end = StreamEnd(model=self.model)
        try:
            async for chunk in stream:
                if getattr(chunk, "usage", None) is not None:
                    end.usage = usage_from(chunk.usage)
                if chunk.model:
                    end.model = chunk.model
                for choice in chunk.choices or []:
                    delta = choice.delta
                    if delta is not None:
                        reasoning = getattr(delta, "reasoning_content", None) or getattr(
                            delta, "reasoning", None
                        )
                        if reasoning:
                            yield ("reasoning", str(reasoning))
                        if delta.content:
                            yield ("content", delta.content)
                        for tc in delta.tool_calls or []:
                            slot = calls.setdefault(tc.index if tc.index is not None else len(calls),
                                                    {"id": "", "name": "", "arguments": ""})  # fmt: skip
                            if tc.id:
                                slot["id"] = tc.id
                            if tc.function is not None:
                                if tc.function.name:
                                    slot["name"] += tc.function.name
                                if tc.function.arguments:
                                    slot["arguments"] += tc.function.arguments
                    if choice.finish_reason:
                        end.finish_reason = choice.finish_reason
        except Exception as exc:
            raise self._map(exc, streaming=True) from None
        finally:
            await stream.close()
        end.tool_calls = [
            {
                "id": c["id"] or f"call_{i}",
                "type": "function",
                "function": {"name": c["name"], "arguments": c["arguments"] or "{}"},
            }
            for i, c in sorted(calls.items())
        ]
        yield end

    def _map(self, exc: BaseException, *, streaming: bool = False) -> ClientError:
        import openai

        where = self.base_url
        if isinstance(exc, ClientError):
            return exc
        timeouts, http_errors = _transport_errors()
        if isinstance(exc, openai.APITimeoutError) or (streaming and isinstance(exc, timeouts)):
            if streaming:
                return ClientError("stream", f"{where} stopped sending for {self.read_timeout_s:g} s; the answer "
                                   "was cut off", retryable=True)  # fmt: skip
            return ClientError(
                "connect", f"{where} did not answer in time; is the server overloaded?", retryable=True
            )
        if streaming and isinstance(exc, (openai.APIConnectionError, *http_errors)):
            cause = exc.__cause__ or exc.__context__ or exc
            return ClientError("stream", f"the stream from {where} broke off ({type(cause).__name__}: {cause})",
                               retryable=True)  # fmt: skip
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc.__context__
            detail = f" ({type(cause).__name__}: {cause})" if cause else ""
            return ClientError(
                "connect", f"cannot reach {where}{detail}; is the server running?", retryable=True
            )
        if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
            return ClientError(
                "auth",
                f"{where} refused the API key ({exc.status_code}: {_server_message(exc)}); pass --api-key or set "
                "DSV_API_KEY / OPENAI_API_KEY",
            )
        if isinstance(exc, openai.RateLimitError):
            after = _retry_after(exc.response.headers)
            wait = f"; retry in {after:g} s" if after is not None else ""
            return ClientError("rate_limit", f"{where} is rate limiting (429: {_server_message(exc)}){wait}",
                               retry_after_s=after, retryable=True)  # fmt: skip
        if isinstance(exc, openai.APIStatusError):
            code = exc.status_code
            return ClientError(
                "server", f"{where} answered {code}: {_server_message(exc)}", retryable=code >= 500
            )
        if isinstance(exc, openai.APIError):  # an error event inside the stream
            return ClientError("stream", f"{where} reported an error mid-stream: {_server_message(exc)}",
                               retryable=True)  # fmt: skip
        if isinstance(exc, json.JSONDecodeError | ValueError | KeyError | TypeError | AttributeError):
            return ClientError("stream", f"{where} sent a malformed stream ({type(exc).__name__}: {exc})",
                               retryable=True)  # fmt: skip
        if isinstance(exc, http_errors):
            return ClientError(
                "connect", f"cannot reach {where} ({type(exc).__name__}: {exc})", retryable=True
            )
        return ClientError("stream", f"unexpected failure talking to {where}: {type(exc).__name__}: {exc}",
                           retryable=True)  # fmt: skip

    # ------------------------------------------------------------------ token counts
    def tokenize_sync(
        self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None, thinking: bool
    ) -> int | None:
        """Exact prompt tokens of ``messages`` from the server's ``/tokenize`` (dsv serve, vLLM); None
        when the endpoint has none (remembered, so it is asked once)."""
        if self.tokenize_supported is False or not messages:
            return None if messages else 0
        body: dict[str, Any] = {"model": self.model, "messages": messages,
                                "thinking": {"type": "enabled" if thinking else "disabled"}}  # fmt: skip
        if tools:
            body["tools"] = tools
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            r = httpx.post(f"{self.server_root}/tokenize", json=body, headers=headers, timeout=2.0)
        except httpx.HTTPError:
            return None  # down right now: try again next time
        if r.status_code in (404, 405):
            self.tokenize_supported = False
            return None
        if r.status_code != 200:
            return None
        try:
            data = r.json()
            count = int(data["count"]) if "count" in data else len(data["tokens"])
        except (ValueError, KeyError, TypeError):
            self.tokenize_supported = False
            return None
        self.tokenize_supported = True
        return count

    async def aclose(self) -> None:
        if self._client_and_loop is not None:
            client, self._client_and_loop = self._client_and_loop[0], None
            await client.close()
