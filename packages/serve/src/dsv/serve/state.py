"""The state one server shares across its routes, and the request helpers every route uses.

:class:`ServerState` holds the backend, the settings, the metrics and the in-flight count, and
turns a request into engine work: the JSON body read and validated (the OpenAI error shape, a
400 for bodies nested too deep), the model name resolved (``-reasoner`` switches thinking on),
admission (429 when full, 503 while draining), the token budget, the chat encoding, the thinking
switch in each form clients send it, the structured-output grammar and the ``GenParams`` of one
choice. Routes (:mod:`dsv.serve.routes`) get it from ``request.app.state.server``.

Run the checks: ``pytest packages/serve/tests``.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from pydantic import ValidationError

from dsv.core.chat import ChatFormatError, encode_messages
from dsv.serve.backend import Backend, LocalBackend
from dsv.serve.engine import GenParams
from dsv.serve.grammar import (
    GrammarError,
    check_grammar,
    choice_grammar,
    json_object_grammar,
    json_schema_grammar,
    lark_grammar,
    parse_guided_json,
    regex_grammar,
    schema_of,
)
from dsv.serve.metrics import Metrics
from dsv.serve.schemas import APIError
from dsv.serve.streaming import Extras
from dsv.serve.tool_grammar import Start, tool_call_grammar

__all__ = ["ResponseStore", "ServerSettings", "ServerState"]


@dataclass(kw_only=True)
class ServerSettings:
    """Limits and identity of one server."""

    model_name: str
    api_key: str | None = None
    max_request_bytes: int = 1 << 20
    max_tokens_limit: int = 4096
    default_max_tokens: int = 512
    max_in_flight: int = 256
    request_timeout_s: float = 600.0
    shutdown_grace_s: float = 10.0
    # Log a status line (token rates, running and waiting sequences, cache use) this often while
    # there is work, to the ``dsv.serve`` logger; 0 turns it off.
    stats_interval_s: float = 0.0
    # Accept (and ignore) request fields neither OpenAI nor vLLM documents, instead of a 400.
    allow_unknown_fields: bool = False
    # Responses kept for ``previous_response_id`` (``store: true``): at most this many, this long.
    responses_kept: int = 1024
    responses_ttl_s: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "max_tokens_limit", "default_max_tokens", "max_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("request_timeout_s", "shutdown_grace_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.stats_interval_s < 0:
            raise ValueError(f"stats_interval_s must be >= 0 (0 turns it off), got {self.stats_interval_s}")


class ResponseStore:
    """Stored Responses (for ``previous_response_id`` and ``GET /v1/responses/{id}``), bounded in
    number (the oldest goes first) and in age; in memory, so a restart forgets them."""

    def __init__(self, kept: int, ttl_s: float) -> None:
        self.kept, self.ttl_s = kept, ttl_s
        self._items: OrderedDict[str, tuple[float, dict[str, Any], list[dict[str, Any]]]] = OrderedDict()

    def put(self, response: dict[str, Any], messages: list[dict[str, Any]]) -> None:
        """Keep ``response`` and the conversation it ends (chat messages, its own output included)."""
        self._items[response["id"]] = (time.monotonic(), response, messages)
        while len(self._items) > self.kept:
            self._items.popitem(last=False)

    def get(self, rid: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """The response and its conversation, None when unknown or expired."""
        item = self._items.get(rid)
        if item is None:
            return None
        if time.monotonic() - item[0] > self.ttl_s:
            del self._items[rid]
            return None
        return item[1], item[2]

    def delete(self, rid: str) -> bool:
        return self._items.pop(rid, None) is not None


class ServerState:
    """One server's backend, settings and metrics, its in-flight requests and the request helpers."""

    def __init__(self, backend: Backend, settings: ServerSettings) -> None:
        self.backend, self.settings = backend, settings
        self.metrics = Metrics(backend, settings.model_name)
        self.in_flight = 0
        self.draining = False
        # (time, tokens) of recent output, for dsv_tokens_per_second
        self.tps_window: deque[tuple[float, int]] = deque(maxlen=512)
        self.responses = ResponseStore(settings.responses_kept, settings.responses_ttl_s)

    async def read_json(self, request: Request, model: type) -> Any:
        """The body validated as ``model``; a 400/413 in the OpenAI shape naming what is wrong."""
        raw = await request.body()
        if len(raw) > self.settings.max_request_bytes:
            raise APIError(
                413, f"request body over {self.settings.max_request_bytes} bytes", code="request_too_large"
            )
        try:
            obj = json.loads(raw)
        except RecursionError:
            obj = _TOO_DEEP
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"malformed JSON body: {e}", code="invalid_json") from None
        if obj is _TOO_DEEP or _depth_over(obj, _MAX_DEPTH):
            raise APIError(400, f"the JSON body is nested more than {_MAX_DEPTH} levels deep; flatten it",
                           code="invalid_json")  # fmt: skip
        if not isinstance(obj, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        try:
            return model.model_validate(obj, context={"allow_unknown_fields": self.settings.allow_unknown_fields})
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or (first.get("ctx") or {}).get("field")
            if param and not first["loc"]:  # the message names the field already
                raise APIError(400, first["msg"], param=param, code="invalid_value") from None
            kind = "invalid_tool_schema" if param and param.startswith("tools") else "invalid_value"
            raise APIError(
                400, f"{param}: {first['msg']}" if param else first["msg"], param=param, code=kind
            ) from None

    def resolve_model(self, name: str) -> bool | None:
        """None for the served name, True for its ``-reasoner`` alias (thinking on), else a 404."""
        if name == self.settings.model_name:
            return None
        if name == f"{self.settings.model_name}-reasoner":
            return True
        raise APIError(
            404,
            f"The model `{name}` does not exist; this server serves `{self.settings.model_name}` "
            f"(and `{self.settings.model_name}-reasoner` for thinking mode)",
            param="model",
            code="model_not_found",
        )

    def admit(self) -> None:
        """Refuse new work while draining (503) or when ``max_in_flight`` requests run (429)."""
        if self.draining:
            raise APIError(503, "server is shutting down", type="server_error", code="shutting_down")
        if self.in_flight >= self.settings.max_in_flight:
            raise APIError(429, "too many requests in flight; retry shortly", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"})  # fmt: skip

    def budget(self, prompt_tokens: int, asked: int | None) -> int:
        """The request's ``max_tokens`` (asked, or the default that fits); a 400 when over the limit
        or the context length."""
        if asked is not None and asked > self.settings.max_tokens_limit:
            raise APIError(400, f"max_tokens is {asked}; this server allows at most {self.settings.max_tokens_limit}",
                           param="max_tokens", code="invalid_value")  # fmt: skip
        room = self.backend.max_model_len - prompt_tokens
        max_tokens = asked if asked is not None else min(self.settings.default_max_tokens, room)
        if prompt_tokens + max_tokens > self.backend.max_model_len or room < 1:
            raise APIError(
                400,
                f"This model's maximum context length is {self.backend.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion.",
                param="messages",
                code="context_length_exceeded",
            )
        return max_tokens

    def check_token_ids(self, param: str, ids: Iterable[int]) -> None:
        """400 naming ``param`` for the first of ``ids`` the model does not have."""
        bad = next((t for t in ids if not 0 <= t < self.backend.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"{param} token id {bad} is out of range: this model takes ids 0 to "
                           f"{self.backend.vocab_size - 1}", param=param, code="invalid_value")  # fmt: skip

    def thinking_mode(self, req: Any, alias: bool | None) -> bool:
        """Thinking as the DeepSeek API switches it (``thinking.type``), else as vLLM does
        (``chat_template_kwargs.thinking``), else the ``-reasoner`` alias."""
        if req.thinking is not None:
            return bool(req.thinking.type == "enabled")
        kwargs = getattr(req, "chat_template_kwargs", None) or {}
        for key in ("thinking", "enable_thinking"):
            if key in kwargs:
                return bool(kwargs[key])
        return bool(alias)

    def output_grammar(self, req: Any) -> str:
        """The grammar the request's structured-output field asks for ("" for none); a 400 naming
        the field and the unsupported feature otherwise."""
        rf, so = req.response_format, req.structured_outputs
        param, build = "", None
        if rf is not None and rf.type == "json_object":
            param, build = "response_format", json_object_grammar
        elif rf is not None and rf.type == "json_schema":
            schema = schema_of(rf.json_schema)
            if schema is None:
                raise APIError(400, "response_format.json_schema needs a schema", param="response_format",
                               code="invalid_value")  # fmt: skip
            param, build = "response_format", lambda: json_schema_grammar(schema)
        elif req.guided_json is not None:
            param, build = "guided_json", lambda: json_schema_grammar(parse_guided_json(req.guided_json))
        elif req.guided_regex is not None:
            param, build = "guided_regex", lambda: regex_grammar(req.guided_regex)
        elif req.guided_choice is not None:
            param, build = "guided_choice", lambda: choice_grammar(req.guided_choice)
        elif req.guided_grammar is not None:
            param, build = "guided_grammar", lambda: lark_grammar(req.guided_grammar)
        elif so is not None:
            param = "structured_outputs"
            if so.json_ is not None:
                build = lambda: json_schema_grammar(parse_guided_json(so.json_))  # noqa: E731
            elif so.regex is not None:
                build = lambda: regex_grammar(so.regex)  # noqa: E731
            elif so.choice is not None:
                build = lambda: choice_grammar(so.choice)  # noqa: E731
            elif so.grammar is not None:
                build = lambda: lark_grammar(so.grammar)  # noqa: E731
            elif so.json_object:
                build = json_object_grammar
        if build is None:
            return ""
        if not isinstance(self.backend, LocalBackend):
            raise APIError(400, f"{param}: structured outputs are enforced by the native engine only; this server "
                           "proxies another engine", param=param, code="invalid_value")  # fmt: skip
        try:
            grammar = build()
            check_grammar(grammar)
        except GrammarError as e:
            raise APIError(400, f"{param}: {e}", param=param, code="unsupported_schema") from None
        return grammar

    def tool_grammar(self, tools: list[dict[str, Any]], name: str | None, start: Start, several: bool) -> str:
        """The grammar of a forced call (:func:`dsv.serve.tool_grammar.tool_call_grammar`); a 400
        naming the tool whose parameter schema cannot be enforced."""
        def build(subset: list[dict[str, Any]], only: str | None) -> str:
            grammar = lark_grammar(tool_call_grammar(subset, self.backend.templates, name=only, start=start,
                                                     several=several))  # fmt: skip
            check_grammar(grammar)
            return grammar

        try:
            return build(tools, name)
        except (GrammarError, ValueError) as e:
            # Name the tool at fault: a client with many tools cannot guess which schema it is.
            for tool in tools if name is None else [t for t in tools if t["function"]["name"] == name]:
                try:
                    build([tool], tool["function"]["name"])
                except (GrammarError, ValueError) as inner:
                    raise APIError(400, f"tools: the parameters of `{tool['function']['name']}` cannot be "
                                   f"enforced: {inner}", param="tools", code="unsupported_schema") from None  # fmt: skip
            raise APIError(400, f"tools: cannot be enforced: {e}", param="tools", code="unsupported_schema") from None

    def extras(self, req: Any, thinking: bool = False) -> Extras:
        """What a choice of ``req`` asks of the backend and text layer beyond ``GenParams``."""
        return Extras(req.stops(), req.include_stop_str_in_output, req.ignore_eos, req.skip_special_tokens,
                       thinking)  # fmt: skip

    def chat_text(self, req: Any, thinking: bool, tools: list[dict[str, Any]] | None, schema: Any = None) -> str:
        """``req.messages`` in the V3.2 prompt format (a 400 for a conversation the encoding refuses)."""
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            return encode_messages(messages, thinking=thinking, tools=tools, response_format=schema,
                                   templates=self.backend.templates)  # fmt: skip
        except ChatFormatError as e:
            raise APIError(400, str(e), param="messages", code="invalid_messages") from None

    def sampling(
        self, req: Any, max_tokens: int, i: int, top_logprobs: int,
        prefix_choices: tuple[tuple[int, ...], ...] = (), prefix_after: tuple[int, ...] = (),
        grammar: str = "", grammar_after: tuple[int, ...] = (), prompt_logprobs: int | None = None,
    ) -> GenParams:  # fmt: skip
        """The ``GenParams`` of choice ``i`` of ``req`` (its seed is ``seed + i``)."""
        seed = None if req.seed is None else req.seed + i
        bias = req.bias()
        return GenParams(temperature=req.temperature, top_p=req.top_p, top_k=max(req.top_k, 0),
                         max_tokens=max_tokens, seed=seed, top_logprobs=top_logprobs,
                         presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                         logit_bias=bias, prefix_choices=prefix_choices, prefix_after=prefix_after,
                         min_p=req.min_p, repetition_penalty=req.repetition_penalty,
                         min_tokens=min(req.min_tokens, max_tokens), stop_token_ids=tuple(req.stop_token_ids or ()),
                         grammar=grammar, grammar_after=grammar_after if grammar else (),
                         prompt_logprobs=prompt_logprobs)  # fmt: skip


# Deeper bodies are refused before validation: pydantic and the chat encoding recurse per level, and
# no request dsv takes (tool schemas included) needs this many.
_MAX_DEPTH = 64
_TOO_DEEP = object()


def _depth_over(obj: Any, limit: int) -> bool:
    """Whether ``obj`` nests lists and objects more than ``limit`` levels deep (iterative)."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return False

