"""What the agent tells the UI: plain dataclasses yielded by `Agent.run_turn`, in this order per step.

    Status("connecting") -> TurnStarted(request_messages, step) -> Status("waiting")
    -> Status("streaming") -> ReasoningDelta* / ContentDelta* -> ToolCallStarted* -> StepFinished
    -> for each call: [ApprovalNeeded] -> Status("tool") -> ToolCallFinished
    ... next step ... -> TurnFinished -> Status("idle")

A failure anywhere ends the turn with `AgentError` followed by `Status("error")`; `run_turn` never
raises for what the endpoint or a tool did. No Textual here: the app turns these into widgets and
`--print` into text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "AgentError",
    "AgentEvent",
    "ApprovalNeeded",
    "ContentDelta",
    "ReasoningDelta",
    "Status",
    "StepFinished",
    "ToolCallFinished",
    "ToolCallStarted",
    "TurnFinished",
    "TurnStarted",
    "Usage",
]

# "session" (added to the contract's kinds): the session file could not be written (disk full, folder
# gone); the conversation is intact in memory and the next save tries again.
ErrorKind = Literal["connect", "auth", "rate_limit", "stream", "server", "tool", "cancelled", "session"]
State = Literal["connecting", "waiting", "streaming", "tool", "idle", "error"]


@dataclass
class Usage:
    """Token counts of one request (or, summed, of a turn) as the endpoint reported them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int | None = None
    cached_tokens: int | None = None

    def __add__(self, other: Usage) -> Usage:
        def add(a: int | None, b: int | None) -> int | None:
            return None if a is None and b is None else (a or 0) + (b or 0)

        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            add(self.reasoning_tokens, other.reasoning_tokens),
            add(self.cached_tokens, other.cached_tokens),
        )

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int | None]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cached_tokens": self.cached_tokens,
        }


@dataclass
class TurnStarted:
    """A request is about to go out; `request_messages` is exactly its `messages` (rule applied)."""

    request_messages: list[dict[str, Any]]
    step: int


@dataclass
class ReasoningDelta:
    text: str
    step: int


@dataclass
class ContentDelta:
    text: str
    step: int


@dataclass
class ToolCallStarted:
    """The model asked for a tool; `arguments` is the raw JSON text it wrote."""

    call_id: str
    name: str
    arguments: str
    step: int


@dataclass
class ApprovalNeeded:
    """The policy wants the user's word before this call runs; `preview` is a diff, command or code."""

    call_id: str
    name: str
    arguments: dict[str, Any]
    preview: str


@dataclass
class ToolCallFinished:
    call_id: str
    name: str
    ok: bool
    result: str  # what goes back to the model (after truncation)
    duration_s: float
    truncated: bool


@dataclass
class StepFinished:
    """One request/response is done and its assistant message is saved in the session."""

    step: int
    usage: Usage | None
    latency_s: float
    ttft_s: float | None  # time to the first reasoning or content token
    finish_reason: str


@dataclass
class TurnFinished:
    usage: Usage  # summed over the turn's steps
    latency_s: float
    answer: str


@dataclass
class AgentError:
    """A failure shown to the user; the turn stops, the session stays valid.

    `retryable` errors can be retried with `Agent.retry_turn` (the same turn, no new user message);
    `retry_after_s` is the server's Retry-After for rate limits."""

    kind: ErrorKind
    message: str
    retry_after_s: float | None = None
    retryable: bool = False


@dataclass
class Status:
    state: State
    detail: str = ""


AgentEvent = (
    TurnStarted
    | ReasoningDelta
    | ContentDelta
    | ToolCallStarted
    | ApprovalNeeded
    | ToolCallFinished
    | StepFinished
    | TurnFinished
    | AgentError
    | Status
)
