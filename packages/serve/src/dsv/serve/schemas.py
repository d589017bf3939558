"""Wire formats of the OpenAI-compatible API (pydantic) and the OpenAI error shape.

Unknown request fields are accepted and ignored, as the OpenAI API does; wrong types, out-of-range
values and malformed messages are schema violations (HTTP 400, ``invalid_request_error``).

Run the checks: ``pytest packages/serve/tests/test_serve_fuzz.py``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

__all__ = [
    "APIError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "Thinking",
    "Tool",
    "error_body",
]

_TOOL_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


class APIError(Exception):
    """An error returned to the client in the OpenAI shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Base(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionDef(_Base):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _TOOL_NAME.match(v):
            raise ValueError("function name must be 1-64 characters of a-z, A-Z, 0-9, _ or -")
        return v

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v.get("type", "object") != "object":
            raise ValueError('function parameters must be a JSON schema of "type": "object"')
        if v is not None and "properties" in v and not isinstance(v["properties"], dict):
            raise ValueError("function parameters.properties must be an object")
        return v


class Tool(_Base):
    type: Literal["function"] = "function"
    function: FunctionDef


class FunctionCall(_Base):
    name: str
    arguments: str = "{}"


class ToolCallIn(_Base):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class TextPart(_Base):
    type: Literal["text"]
    text: str


class ChatMessage(_Base):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatMessage:
        if self.role in ("user", "developer") and self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        if self.role != "assistant" and (self.tool_calls or self.reasoning_content is not None):
            raise ValueError("only assistant messages carry tool_calls or reasoning_content")
        return self


class Thinking(_Base):
    type: Literal["enabled", "disabled"]


class NamedToolChoice(_Base):
    type: Literal["function"] = "function"
    function: dict[str, str]


class StreamOptions(_Base):
    include_usage: bool = False


class ResponseFormat(_Base):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None


class _Sampling(_Base):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    n: int = Field(default=1, ge=1, le=16)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        if len(v) > 300:
            raise ValueError("logit_bias takes at most 300 tokens")
        for key, bias in v.items():
            if not key.isdigit():
                raise ValueError(
                    f"logit_bias keys are token ids (non-negative integers as strings), got {key!r}"
                )
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {key}")
        return v

    def bias(self) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as (token id, bias) pairs."""
        return tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items())

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    thinking: Thinking | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None

    # The deprecated forms of tools / tool_choice: refused with the way forward, not ignored (a client
    # sending them would otherwise get a model that never sees its functions).
    functions: list[Any] | None = None
    function_call: Any = None

    @field_validator("functions", "function_call")
    @classmethod
    def _legacy_functions(cls, v: Any, info: ValidationInfo) -> Any:
        if v is not None:
            raise ValueError(
                f"{info.field_name} is the deprecated form of {'tools' if info.field_name == 'functions' else 'tool_choice'}; "
                "send tools (and tool_choice) instead"
            )
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    max_tokens: int | None = Field(default=16, ge=1)
    # Known OpenAI fields this server does not implement: refused when they would change the answer,
    # rather than ignored.
    best_of: int | None = Field(default=None, ge=1)
    suffix: str | None = None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix (insertion) is not supported: put the whole text in prompt")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v != info.data.get("n", 1):
            raise ValueError("best_of is not supported (only best_of equal to n): ask for n choices instead")
        return v

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        # Said plainly rather than as the union's "should be a valid string" for each member.
        if isinstance(v, list) and v and all(isinstance(x, list) for x in v):
            raise ValueError(
                "batched prompts (a list of token-id lists) are not supported: send one request per prompt"
            )
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[int] | list[str]) -> str | list[int] | list[str]:
        if isinstance(v, list) and (not v or (isinstance(v[0], str) and len(v) != 1)):
            raise ValueError(
                "prompt must be a string, one string in a list, or a non-empty list of token ids"
            )
        if v == "" or v == [""]:
            raise ValueError("prompt is empty: give at least one character or token id")
        return v


class TokenizeRequest(_Base):
    """``/tokenize``: a completion ``prompt`` or chat ``messages`` (with ``tools`` and ``thinking``, encoded
    exactly as ``/v1/chat/completions`` encodes them)."""

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    tools: list[Tool] | None = None
    thinking: Thinking | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(_Base):
    model: str
    tokens: list[int]
