"""A thin wrapper over the official ``openai`` client for any OpenAI-compatible endpoint.

Used by ``dsv eval`` (the endpoint is the policy under test) and ``dsv synth build``
(the endpoint proposes environments). It turns one chat-completion call into a plain
assistant message dict (``role``, ``content``, ``reasoning_content``, ``tool_calls``
in the OpenAI shape with JSON-string arguments) plus token usage, so the rest of dsv
never touches SDK objects.

Thinking mode is sent in the forms each kind of server reads, at once: DeepSeek's API and
``dsv serve`` take ``"thinking": {"type": "enabled" | "disabled"}``, vLLM and SGLang pass
``"chat_template_kwargs": {"thinking": bool}`` to the chat template; each ignores or accepts the
other (``dsv serve`` reads both). ``reasoning_content`` is not an OpenAI field, so
it is read from the SDK's extra fields; assistant messages passed back keep it, which
DeepSeek requires inside a tool-calling loop.

With ``stream=True`` the same call uses the SDK's streaming (server-sent
``chat.completion.chunk`` events) and accumulates the deltas: ``reasoning_content``
and ``content`` text, and tool calls by their ``index`` (id and name from the first
delta, argument text concatenated). Usage comes from the final chunk
(``stream_options={"include_usage": true}``). The result is the same ``ChatReply`` a
non-streaming call returns.

Usage: ``EndpointClient(base_url, model).chat(messages, tools=..., thinking=True, stream=False)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ChatReply",
    "ClientNotInstalledError",
    "EndpointClient",
    "EndpointError",
    "Usage",
    "resolve_api_key",
]

API_KEY_ENV_VARS = ("DSV_API_KEY", "OPENAI_API_KEY")


class EndpointError(RuntimeError):
    """The endpoint could not be reached or answered with an error (after the client's retries)."""


class ClientNotInstalledError(ImportError):
    """The ``openai`` client is missing; the message says what to install."""


@dataclass(frozen=True)
class Usage:
    """Token counts of one completion. ``reasoning_tokens`` (``completion_tokens_details``) and
    ``cached_tokens`` (``prompt_tokens_details``: prompt tokens served from the prefix cache) are None
    when the server did not report them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int | None = None
    cached_tokens: int | None = None


@dataclass(frozen=True)
class ChatReply:
    """One assistant turn: the message dict to append to the conversation, usage and finish reason."""

    message: dict[str, Any]
    usage: Usage
    finish_reason: str | None


def resolve_api_key(api_key: str | None) -> str:
    """The key to send: the explicit one, else ``$DSV_API_KEY`` / ``$OPENAI_API_KEY``, else a dummy.

    Local servers (vLLM, SGLang, ``dsv serve``) usually accept any key, so a missing
    one is not an error here; a server that needs one answers 401, reported as such.
    """
    if api_key:
        return api_key
    for name in API_KEY_ENV_VARS:
        value = os.environ.get(name)
        if value:
            return value
    return "EMPTY"


def _message_to_dict(message: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"role": "assistant", "content": message.content or ""}
    extra = getattr(message, "model_extra", None) or {}
    reasoning = extra.get("reasoning_content")
    if reasoning is None:
        reasoning = getattr(message, "reasoning_content", None)
    if reasoning is not None:
        out["reasoning_content"] = str(reasoning)
    if message.tool_calls:
        out["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": call.function.arguments or "{}"},
            }
            for call in message.tool_calls
        ]
    return out


def _usage(usage: Any) -> Usage:
    if usage is None:
        return Usage()
    details = getattr(usage, "completion_tokens_details", None)
    reasoning = getattr(details, "reasoning_tokens", None) if details is not None else None
    prompt_details = getattr(usage, "prompt_tokens_details", None)
    cached = getattr(prompt_details, "cached_tokens", None) if prompt_details is not None else None
    return Usage(
        prompt_tokens=int(usage.prompt_tokens or 0),
        completion_tokens=int(usage.completion_tokens or 0),
        reasoning_tokens=None if reasoning is None else int(reasoning),
        cached_tokens=None if cached is None else int(cached),
    )


class EndpointClient:
    """Chat completions against ``base_url`` with ``model``; thread-safe (one HTTP pool shared)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 2,
        max_connections: int = 64,
    ) -> None:
        try:
            import httpx
            from openai import OpenAI
        except ImportError as exc:
            from dsv.cli.errors import install_hint

            # openai pulls httpx in: a missing httpx means a missing openai too
            missing = "openai" if exc.name in (None, "httpx") or exc.name.startswith("openai") else exc.name
            raise ClientNotInstalledError(
                f"talking to an OpenAI-compatible endpoint needs the openai client ({missing} is missing); "
                f"install it with {install_hint('dsv-synth', 'eval')}"
            ) from None

        self.base_url = base_url
        self.model = model
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._client = OpenAI(
            base_url=base_url,
            api_key=resolve_api_key(api_key),
            timeout=timeout_s,
            max_retries=max_retries,
            http_client=httpx.Client(limits=limits, timeout=timeout_s),
        )

    def chat(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        thinking: bool | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        seed: int | None = None,
        stream: bool = False,
    ) -> ChatReply:
        """One completion (streamed and accumulated when ``stream``); ``EndpointError`` on failure."""
        import openai

        kwargs: dict[str, Any] = {"model": self.model, "messages": messages}
        if tools:
            kwargs["tools"] = tools
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        if temperature is not None:
            kwargs["temperature"] = temperature
        if seed is not None:
            kwargs["seed"] = seed
        if thinking is not None:
            kwargs["extra_body"] = {
                "thinking": {"type": "enabled" if thinking else "disabled"},
                "chat_template_kwargs": {"thinking": thinking},
            }
        try:
            if stream:
                return self._stream(kwargs)
            response = self._client.chat.completions.create(**kwargs)
        except openai.APIStatusError as exc:
            raise EndpointError(f"{self.base_url} answered HTTP {exc.status_code}: {exc.message}") from exc
        except openai.APIError as exc:
            raise EndpointError(f"{self.base_url}: {exc.__class__.__name__}: {exc}") from exc
        if not response.choices:
            raise EndpointError(f"{self.base_url} returned no choices")
        choice = response.choices[0]
        return ChatReply(_message_to_dict(choice.message), _usage(response.usage), choice.finish_reason)

    def _stream(self, kwargs: dict[str, Any]) -> ChatReply:
        content: list[str] = []
        reasoning: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        finish_reason: str | None = None
        usage: Any = None
        saw_choice = False
        events = self._client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
        try:
            for chunk in events:
                if chunk.usage is not None:
                    usage = chunk.usage
                if not chunk.choices:
                    continue
                saw_choice = True
                choice = chunk.choices[0]
                if choice.finish_reason:
                    finish_reason = choice.finish_reason
                delta = choice.delta
                if delta is None:
                    continue
                extra = getattr(delta, "model_extra", None) or {}
                piece = extra.get("reasoning_content")
                if piece is None:
                    piece = getattr(delta, "reasoning_content", None)
                if piece:
                    reasoning.append(str(piece))
                if delta.content:
                    content.append(delta.content)
                for call in delta.tool_calls or []:
                    slot = calls.setdefault(call.index, {"id": None, "name": "", "arguments": []})
                    if call.id:
                        slot["id"] = call.id
                    if call.function is not None:
                        if call.function.name:
                            slot["name"] += call.function.name
                        if call.function.arguments:
                            slot["arguments"].append(call.function.arguments)
        finally:
            events.close()
        if not saw_choice:
            raise EndpointError(f"{self.base_url} streamed no choices")
        message: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
        if reasoning:
            message["reasoning_content"] = "".join(reasoning)
        if calls:
            message["tool_calls"] = [
                {
                    "id": slot["id"] or f"call_{index}",
                    "type": "function",
                    "function": {"name": slot["name"], "arguments": "".join(slot["arguments"]) or "{}"},
                }
                for index, slot in sorted(calls.items())
            ]
        return ChatReply(message, _usage(usage), finish_reason)

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._client.close()
