"""Wire formats of the OpenAI-compatible API (pydantic) and the OpenAI error shape.

Every field of OpenAI's chat and completions requests and of vLLM's documented extensions is
known: the ones dsv acts on are fields here, the ones that change nothing dsv could do
(``metadata``, ``store``, ``service_tier``, vLLM's ``priority``...) are listed in ``IGNORED`` and
accepted, and the known ones dsv does not implement are refused when set to anything but their
default (``use_beam_search``, ``logits_processors``...), with the field named. A field nobody
documents is a 400 naming it (the server's ``--allow-unknown-fields`` relaxes this): a client
written for another server then learns that its setting was not applied. Wrong types,
out-of-range values (non-finite floats included) and malformed messages are schema violations
(HTTP 400, ``invalid_request_error``). Nested objects (messages, tools) ignore extra keys, as
OpenAI's do.

Run the checks: ``pytest packages/serve/tests/test_serve_fuzz.py``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

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
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


# Known request fields that change nothing dsv can do; accepted and ignored (the serve README lists
# them). Per endpoint family; shared ones in both.
_IGNORED_COMMON = frozenset({
    "user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
    # vLLM: scheduling, bookkeeping and detokenization details with no effect here
    "priority", "request_id", "cache_salt", "kv_transfer_params", "vllm_xargs", "length_penalty",
    "spaces_between_special_tokens", "guided_decoding_backend", "guided_whitespace_pattern",
    "add_special_tokens", "return_tokens_as_token_ids", "return_token_ids",
})  # fmt: skip
IGNORED_CHAT = _IGNORED_COMMON | {
    "modalities", "verbosity", "reasoning_effort", "add_generation_prompt", "documents",
    "mm_processor_kwargs", "echo",
}  # fmt: skip
IGNORED_COMPLETIONS = _IGNORED_COMMON
# Known fields dsv does not implement: a 400 naming them unless they carry their default.
_REFUSED: dict[str, Any] = {
    "use_beam_search": False, "logits_processors": None, "bad_words": None, "allowed_token_ids": None,
    "chat_template": None, "continue_final_message": False, "truncate_prompt_tokens": None,
    "audio": None, "prediction": None, "web_search_options": None, "structural_tag": None,
}  # fmt: skip


def _check_fields(cls: type[BaseModel], obj: Any, ignored: frozenset[str], info: ValidationInfo) -> Any:
    """Refuse unknown fields (unless the server relaxes it) and known, unimplemented ones."""
    if not isinstance(obj, dict):
        return obj
    known = set(cls.model_fields)
    refused = [k for k, default in _REFUSED.items() if k in obj and obj[k] not in (default, None, [], {})]
    if refused:
        raise PydanticCustomError(
            "unsupported_field",
            "{names}: not supported by dsv serve; leave it out",
            {"names": ", ".join(refused), "field": refused[0]},
        )
    strict = not (info.context or {}).get("allow_unknown_fields", False)
    unknown = sorted(str(k) for k in obj if k not in known and k not in ignored and k not in _REFUSED)
    if unknown and strict:
        raise PydanticCustomError(
            "unknown_field",
            "unknown field {names}: dsv serve takes OpenAI's and vLLM's documented fields (start it with "
            "--allow-unknown-fields to ignore others)",
            {"names": ", ".join(f"`{k}`" for k in unknown), "field": unknown[0]},
        )
    return obj


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

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        # Name the part a text-only model cannot take, rather than pydantic's union mismatch.
        if isinstance(value, list):
            for j, part in enumerate(value):
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise PydanticCustomError(
                        "unsupported_content",
                        f"part {j} is `{kind}`: this model takes text only (images, audio and files are not "
                        "supported); send text parts",
                    )
        return value

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

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('a response_format of type "json_schema" needs json_schema: {"name", "schema"}')
        return self


class StructuredOutputs(_Base):
    """vLLM's ``structured_outputs`` (one of its keys)."""

    json_: dict[str, Any] | str | bool | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class _Sampling(_Base):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)  # vLLM's -1 is "off", as 0 is
    n: int = Field(default=1, ge=1, le=16)
    # Signed 64 bits, as OpenAI documents it (and what the engine's generator takes).
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    # vLLM's sampling extensions
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    # dsv keeps special tokens unless asked (``</think>`` stays visible in raw completions).
    skip_special_tokens: bool = False
    best_of: int | None = Field(default=None, ge=1)
    # Structured outputs: OpenAI's response_format, vLLM's guided_* and structured_outputs.
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | bool | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and v != info.data.get("n", 1):
            raise ValueError("best_of is not supported (only best_of equal to n): ask for n choices instead")
        return v

    @model_validator(mode="after")
    def _one_structure(self) -> _Sampling:
        given = [name for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                                   "structured_outputs") if getattr(self, name) is not None]  # fmt: skip
        if self.response_format is not None and self.response_format.type != "text":
            given.append("response_format")
        if len(given) > 1:
            raise ValueError(f"give one output constraint, not {' and '.join(given)}")
        if self.min_tokens and self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) is more than max_tokens ({self.max_tokens})")
        return self

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
    # vLLM's way to pass template switches; dsv's template knows ``thinking``.
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _fields(cls, obj: Any, info: ValidationInfo) -> Any:
        return _check_fields(cls, obj, IGNORED_CHAT, info)

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is None:
            return v
        other = sorted(k for k in v if k not in ("thinking", "enable_thinking"))
        if other:
            raise ValueError(
                f"{', '.join(other)}: not a switch of the DeepSeek-V3.2 chat template (it takes thinking)"
            )
        for key in ("thinking", "enable_thinking"):
            if key in v and not isinstance(v[key], bool):
                raise ValueError(f"{key} must be true or false")
        return v
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    thinking: Thinking | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

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
    # A string, a list of token ids, or a batch of either (one set of choices per prompt).
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    max_tokens: int | None = Field(default=16, ge=1)
    # vLLM's: the prompt's own logprobs with this many alternatives (echo with logprobs gives them too).
    prompt_logprobs: int | None = Field(default=None, ge=0, le=20)
    # Known OpenAI field this server does not implement: refused when it would change the answer.
    suffix: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _fields(cls, obj: Any, info: ValidationInfo) -> Any:
        return _check_fields(cls, obj, IGNORED_COMPLETIONS, info)

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix (insertion) is not supported: put the whole text in prompt")
        return v

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v: Any) -> Any:
        # Said plainly rather than as the union's "should be a valid string" for each member.
        if isinstance(v, list) and (not v or not all(isinstance(x, type(v[0])) for x in v)):
            raise ValueError(
                "prompt must be a string, a list of token ids, or a non-empty batch of either (not mixed)"
            )
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        for one in cls.batch(v):
            if one == "" or one == []:
                raise ValueError("prompt is empty: give at least one character or token id")
        if len(cls.batch(v)) > 64:
            raise ValueError("a batch takes at most 64 prompts; split it into several requests")
        return v

    @staticmethod
    def batch(prompt: Any) -> list[str | list[int]]:
        """The prompts of a request: one, or each of a batch."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        return list(prompt)


class TokenizeRequest(_Base):
    """``/tokenize``: a completion ``prompt`` or chat ``messages`` (with ``tools`` and ``thinking``, encoded
    exactly as ``/v1/chat/completions`` encodes them). ``model`` is optional, as in vLLM."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    tools: list[Tool] | None = None
    thinking: Thinking | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool | None = None  # lm-eval's probe sends it; prompts are encoded as given

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(_Base):
    model: str | None = None
    tokens: list[int]


# ---------------------------------------------------------------- the Responses API
IGNORED_RESPONSES = frozenset({
    "user", "service_tier", "prompt_cache_key", "safety_identifier", "include", "truncation", "top_logprobs",
    "stream_options", "max_tool_calls", "prompt_cache_retention",
})  # fmt: skip


class ResponseTool(_Base):
    """A function tool as the Responses API writes it (flat: no ``function`` wrapper)."""

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _function(self) -> ResponseTool:
        if self.type != "function":
            raise PydanticCustomError(
                "unsupported_tool", f"tools of type `{self.type}` are not supported; dsv serve takes function tools"
            )
        if not self.name:
            raise PydanticCustomError("missing_name", "a function tool needs a name")
        return self


class ResponseReasoning(_Base):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: str | None = None
    generate_summary: str | None = None


class ResponsesRequest(_Base):
    """``POST /v1/responses``: what dsv takes of OpenAI's Responses API (text and function tools)."""

    model: str
    input: str | list[dict[str, Any]] = Field(default="")
    instructions: str | None = None
    tools: list[ResponseTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    previous_response_id: str | None = None
    reasoning: ResponseReasoning | None = None
    text: dict[str, Any] | None = None
    store: bool = True
    metadata: dict[str, str] | None = None
    background: bool = False
    conversation: Any = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)

    @model_validator(mode="before")
    @classmethod
    def _fields(cls, obj: Any, info: ValidationInfo) -> Any:
        return _check_fields(cls, obj, IGNORED_RESPONSES, info)

    @model_validator(mode="after")
    def _supported(self) -> ResponsesRequest:
        if self.background:
            raise PydanticCustomError("unsupported_field", "background: not supported by dsv serve; leave it out",
                                      {"field": "background"})  # fmt: skip
        if self.conversation is not None:
            raise PydanticCustomError("unsupported_field", "conversation: not supported by dsv serve; use "
                                      "previous_response_id", {"field": "conversation"})  # fmt: skip
        return self
