"""The agent loop of `dsv chat`: stream a step, run the tools it asked for, repeat until an answer.

One user turn is a loop of steps. Each step sends `Agent.next_request_messages()` (the system
prompt, then the session's messages with DeepSeek-V3.2's thinking-with-tools rule applied by
`dsv.core.chat.apply_thinking_context`: reasoning of the current turn's assistant steps is sent
back, reasoning of earlier turns is dropped, tool calls and results always stay), streams the
response and appends the assistant message, reasoning included, to the session. If it asked for
tools, each call is approved (per `ApprovalPolicy`), run, and its result appended; then the next
step goes out. The session is saved after every appended assistant step and tool result, and
every `STREAM_SAVE_S` while an answer streams (the partial answer written after the messages, not
into them), so a killed terminal loses nothing that was shown.

`run_turn` yields the events of `dsv.tui.events` and never raises for what the endpoint or a tool
did: failures end the turn with `AgentError` and leave the session valid for the next request (a
broken step is not appended; a cancelled one keeps its partial answer, and cancelled tool calls
get a "cancelled" result so every call has one). `retry_turn` re-runs an unfinished turn without a
new user message (the UI's retry after an error). `cancel()` (Esc) stops the stream or the running
tool at once.

Example::

    agent = Agent(ChatClient(url, key, "tiny"), ToolRegistry("."), ApprovalPolicy(), store.new())
    async for event in agent.run_turn("What is in README.md?", approve=ask_the_user):
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from dsv.core.chat import apply_thinking_context, last_user_index
from dsv.tui.client import ChatClient, ClientError, StreamEnd
from dsv.tui.events import (
    AgentError,
    AgentEvent,
    ApprovalNeeded,
    ContentDelta,
    ReasoningDelta,
    Status,
    StepFinished,
    ToolCallFinished,
    ToolCallStarted,
    TurnFinished,
    TurnStarted,
    Usage,
)
from dsv.tui.session import Session
from dsv.tui.tools import Approval, ApprovalPolicy, EditedArguments, ToolRegistry, ToolResult

__all__ = ["Agent", "Approver", "TokenCounts", "estimate_tokens"]

Approver = Callable[[ApprovalNeeded], Awaitable[Approval]]
_CANCEL = object()
STREAM_SAVE_S = 0.5  # while an answer streams, the session file is rewritten at most this often


class TokenCounts(list[int]):
    """Token counts per message; ``exact`` is False when they are estimates (no ``/tokenize``)."""

    def __init__(self, counts: list[int], *, exact: bool) -> None:
        super().__init__(counts)
        self.exact = exact


def estimate_tokens(message: dict[str, Any]) -> int:
    """A rough count for endpoints without ``/tokenize``: about four characters a token, plus the
    few tokens of the role markers."""
    chars = len(str(message.get("content") or "")) + len(str(message.get("reasoning_content") or ""))
    for call in message.get("tool_calls") or []:
        fn = call.get("function", {})
        chars += len(str(fn.get("name") or "")) + len(str(fn.get("arguments") or ""))
    return math.ceil(chars / 4) + 4


class _Cancelled(Exception):
    pass


class _SaveFailed(Exception):
    pass


class Agent:
    """Runs user turns against one endpoint with one tool registry, recording into one session."""

    def __init__(
        self,
        client: ChatClient,
        tools: ToolRegistry,
        policy: ApprovalPolicy,
        session: Session,
        *,
        max_steps: int = 16,
    ) -> None:
        self.client = client
        self.tools = tools
        self.policy = policy
        self.session = session
        self.max_steps = max_steps
        self.running = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cancel_event: asyncio.Event | None = None
        self._queue: asyncio.Queue[Any] | None = None
        self._producer: asyncio.Task[None] | None = None
        self._token_cache: dict[str, int] = {}
        self.token_counts_exact = False  # whether the last `count_tokens` was exact
        session.endpoint = session.endpoint or client.base_url
        session.model = session.model or client.model

    # ------------------------------------------------------------------ what goes out
    @property
    def thinking(self) -> bool:
        return self.session.thinking

    @thinking.setter
    def thinking(self, on: bool) -> None:
        self.session.thinking = on

    def next_request_messages(self, pending_user: str | None = None) -> list[dict[str, Any]]:
        """Exactly the ``messages`` of the next request (with ``pending_user`` as a new user message
        when given): system prompt first, the thinking-with-tools rule applied."""
        messages: list[dict[str, Any]] = []
        if self.session.system:
            messages.append({"role": "system", "content": self.session.system})
        messages += self.session.messages
        if pending_user is not None:
            messages.append({"role": "user", "content": pending_user})
        return apply_thinking_context(messages)

    def count_tokens(self, messages: list[dict[str, Any]]) -> TokenCounts:
        """Tokens per message of ``messages``: exact from the server's ``/tokenize`` (each message's
        count is the growth of the encoded prefix, tools included in the first) where the endpoint
        has it (dsv serve, vLLM), else `estimate_tokens` with ``exact=False`` (also kept in
        ``token_counts_exact``). Results are cached per prefix, so each call asks only about new
        messages; it may do HTTP, so a UI calls it off its event loop."""
        tools = self.tools.schemas() or None
        counts: list[int] = []
        before = 0
        for i in range(len(messages)):
            prefix = messages[: i + 1]
            # Another endpoint or model (/endpoint, /model) has another tokenizer: part of the key.
            key = json.dumps([self.client.base_url, self.client.model, prefix, tools, self.thinking],
                             sort_keys=True, default=str)  # fmt: skip
            total = self._token_cache.get(key)
            if total is None:
                total = self.client.tokenize_sync(prefix, tools=tools, thinking=self.thinking)
                if total is None:
                    self.token_counts_exact = False
                    return TokenCounts([estimate_tokens(m) for m in messages], exact=False)
                self._token_cache[key] = total
            counts.append(max(0, total - before))
            before = total
        self.token_counts_exact = True
        return TokenCounts(counts, exact=True)

    # ------------------------------------------------------------------ turns
    async def run_turn(self, user_text: str, approve: Approver) -> AsyncIterator[AgentEvent]:
        """Append ``user_text`` and run the turn to its answer (see the module docstring)."""
        self.session.messages.append({"role": "user", "content": user_text})
        try:
            self._save()
        except _SaveFailed as exc:
            yield AgentError("session", str(exc))
            yield Status("error", str(exc))
            return
        async for event in self._turn(approve):
            yield event

    async def retry_turn(self, approve: Approver) -> AsyncIterator[AgentEvent]:
        """Run the current turn again from where it stopped (after an error or a cancel). A partial
        answer kept by a cancel is replaced by the new one."""
        stats = self.session.turn_stats[-1] if self.session.turn_stats else {}
        partial = (stats.get("error") or {}).get("partial_message")
        if partial is not None and partial == len(self.session.messages) - 1:
            self.session.messages.pop()
            del stats["error"]["partial_message"]
        last = self.session.messages[-1] if self.session.messages else None
        if last is None or (last.get("role") == "assistant" and not last.get("tool_calls")):
            yield AgentError("server", "nothing to retry: the last turn has its answer; send a new message")
            yield Status("idle")
            return
        async for event in self._turn(approve):
            yield event

    def cancel(self) -> None:
        """Stop the running stream or tool (callable from any thread); the session stays valid."""
        loop = self._loop
        if loop is None or not self.running:
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed
            loop.call_soon_threadsafe(self._do_cancel)

    def _do_cancel(self) -> None:
        if self._cancel_event is not None:
            self._cancel_event.set()
        if self._queue is not None:
            self._queue.put_nowait(_CANCEL)
        if self._producer is not None:
            self._producer.cancel()

    async def _interruptible(self, aw: Awaitable[Any]) -> Any:
        """Await ``aw`` unless `cancel()` comes first (then it is cancelled and `_Cancelled` raised)."""
        assert self._cancel_event is not None, "only inside a turn"
        task = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self._cancel_event.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise _Cancelled

    def _save(self, pending: list[dict[str, Any]] | None = None) -> None:
        """Save the session; a failure (disk full, folder gone) ends the turn as an ``AgentError``."""
        try:
            self.session.save(pending=pending)
        except OSError as exc:
            raise _SaveFailed(
                f"could not save the session to {self.session.path}: {exc.strerror or exc}; free space or fix "
                "the folder (the conversation is still in memory: /save tries again)"
            ) from None

    def _record(self, stats: dict[str, Any]) -> None:
        stats["end_message"] = len(self.session.messages)
        if not self.session.turn_stats or self.session.turn_stats[-1] is not stats:
            self.session.turn_stats.append(stats)
        self._save()

    async def _turn(self, approve: Approver) -> AsyncIterator[AgentEvent]:
        if self.running:
            yield AgentError("server", "a turn is already running; wait for it or press Esc")
            return
        self.running = True
        self._loop = asyncio.get_running_loop()
        self._cancel_event = asyncio.Event()
        started = time.monotonic()
        total = Usage()
        stats: dict[str, Any] = {"user_message": last_user_index(self.session.messages), "steps": [],
                                 "model": self.client.model, "thinking": self.thinking}  # fmt: skip
        try:
            try:
                await self._interruptible(self.tools.start())
            except _Cancelled:
                yield AgentError("cancelled", "stopped by the user", retryable=True)
                yield Status("idle")
                return
            except Exception as exc:
                yield AgentError("tool", f"could not start the tools: {exc}")
                yield Status("error", str(exc))
                return
            for step in range(1, self.max_steps + 1):
                outcome: dict[str, Any] = {}
                try:
                    async for event in self._step(step, approve, outcome):
                        yield event
                except _SaveFailed as exc:
                    outcome["error"] = AgentError("session", str(exc))
                if "error" in outcome:
                    err: AgentError = outcome["error"]
                    stats["error"] = {"kind": err.kind, "message": err.message}
                    if "partial" in outcome:
                        stats["error"]["partial_message"] = outcome["partial"]
                    stats["latency_s"] = time.monotonic() - started
                    stats["usage"] = total.to_dict()
                    with contextlib.suppress(_SaveFailed):  # already failing: the error below says so
                        self._record(stats)
                    yield err
                    yield Status("idle" if err.kind == "cancelled" else "error", err.message)
                    return
                finished: StepFinished = outcome["step"]
                if finished.usage is not None:
                    total = total + finished.usage
                stats["steps"].append({"step": step, "usage": finished.usage.to_dict() if finished.usage else None,
                                       "latency_s": finished.latency_s, "ttft_s": finished.ttft_s,
                                       "finish_reason": finished.finish_reason})  # fmt: skip
                stats["usage"] = total.to_dict()
                stats["latency_s"] = time.monotonic() - started
                try:
                    self._record(stats)
                except _SaveFailed as exc:
                    yield AgentError("session", str(exc))
                    yield Status("error", str(exc))
                    return
                if outcome.get("answer") is not None:
                    yield TurnFinished(total, time.monotonic() - started, outcome["answer"])
                    yield Status("idle")
                    return
            err = AgentError("tool", f"stopped after {self.max_steps} steps without a final answer; "
                             "retry to let it go on, or send a new message", retryable=True)  # fmt: skip
            stats["error"] = {"kind": err.kind, "message": err.message}
            with contextlib.suppress(_SaveFailed):  # the step's own save said so already
                self._record(stats)
            yield err
            yield Status("error", err.message)
        finally:
            self.running = False
            self._cancel_event = None
            self._queue = None
            if self._producer is not None and not self._producer.done():
                self._producer.cancel()
            self._producer = None

    async def _step(self, step: int, approve: Approver, outcome: dict[str, Any]) -> AsyncIterator[AgentEvent]:
        """One request and its tool calls; fills ``outcome`` with ``step`` and ``answer`` or ``error``."""
        assert self._cancel_event is not None
        if self._cancel_event.is_set():  # Esc between two steps
            outcome["error"] = AgentError("cancelled", "stopped by the user", retryable=True)
            return
        request = self.next_request_messages()
        tools = self.tools.schemas() or None
        yield Status("connecting", self.client.base_url)
        yield TurnStarted(request, step)
        t0 = time.monotonic()
        ttft: float | None = None
        reasoning: list[str] = []
        content: list[str] = []
        end: StreamEnd | None = None
        last_save = t0
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queue = queue
        self._producer = asyncio.create_task(self._produce(request, tools, queue))
        while end is None:
            item = await queue.get()
            if item is _CANCEL:
                if reasoning or content:  # keep what was shown; the turn can go on from it
                    message: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
                    if reasoning:
                        message["reasoning_content"] = "".join(reasoning)
                    self.session.messages.append(message)
                    outcome["partial"] = len(self.session.messages) - 1
                    self._save()
                outcome["error"] = AgentError("cancelled", "stopped by the user", retryable=True)
                return
            if isinstance(item, ClientError):
                outcome["error"] = AgentError(item.kind, item.message, item.retry_after_s, item.retryable)  # type: ignore[arg-type]
                return
            if isinstance(item, StreamEnd):
                end = item
                break
            kind, text = item
            if kind == "open":
                yield Status("waiting", "the server is reading the request")
                continue
            if ttft is None:
                ttft = time.monotonic() - t0
                yield Status("streaming")
            if kind == "reasoning":
                reasoning.append(text)
                yield ReasoningDelta(text, step)
            else:
                content.append(text)
                yield ContentDelta(text, step)
            if time.monotonic() - last_save >= STREAM_SAVE_S:
                # What is on the screen is on disk too, give or take the last half second.
                partial = {"role": "assistant", "content": "".join(content)}
                if reasoning:
                    partial["reasoning_content"] = "".join(reasoning)
                self._save(pending=[partial])
                last_save = time.monotonic()
        latency = time.monotonic() - t0
        message = {"role": "assistant", "content": "".join(content)}
        if reasoning:
            message["reasoning_content"] = "".join(reasoning)
        if end.tool_calls:
            message["tool_calls"] = end.tool_calls
        self.session.messages.append(message)
        if end.model and not self.session.model:
            self.session.model = end.model
        self._save()
        for call in end.tool_calls:
            fn = call["function"]
            yield ToolCallStarted(call["id"], fn["name"], fn["arguments"], step)
        finished = StepFinished(step, end.usage, latency, ttft, end.finish_reason)
        outcome["step"] = finished
        yield finished
        if not end.tool_calls:
            outcome["answer"] = message["content"]
            return
        for i, call in enumerate(end.tool_calls):
            try:
                async for event in self._call(call, approve):
                    yield event
            except _Cancelled:
                for rest in end.tool_calls[i:]:
                    result = ToolResult(False, "cancelled by the user before it finished")
                    self._append_result(rest["id"], result)
                    yield ToolCallFinished(
                        rest["id"], rest["function"]["name"], False, result.content, 0.0, False
                    )
                outcome["error"] = AgentError("cancelled", "stopped by the user", retryable=True)
                return

    async def _produce(self, request: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                       queue: asyncio.Queue[Any]) -> None:  # fmt: skip
        try:
            async for item in self.client.stream(request, tools=tools, thinking=self.thinking):
                queue.put_nowait(item)
        except ClientError as exc:
            queue.put_nowait(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug below must end the turn with a message, not hang it
            queue.put_nowait(ClientError("stream", f"{type(exc).__name__}: {exc}", retryable=True))

    async def _call(self, call: dict[str, Any], approve: Approver) -> AsyncIterator[AgentEvent]:
        fn = call["function"]
        name, raw = fn["name"], fn["arguments"]
        try:
            arguments: Any = json.loads(raw or "{}")
        except json.JSONDecodeError:
            arguments = raw  # the registry answers with what is wrong
        tool = None
        with contextlib.suppress(KeyError):
            tool = self.tools.get(name)
        if tool is not None and isinstance(arguments, dict) and self.policy.needs_approval(tool):
            event = ApprovalNeeded(call["id"], name, arguments, self.tools.preview(name, arguments))
            yield event
            refusal = "the user denied this call; ask them or try something else"
            try:
                decision = await self._interruptible(approve(event))
            except _Cancelled:
                raise
            except Exception as exc:  # a broken approval dialog must not run the call, nor end the turn
                decision, refusal = (
                    "deny",
                    f"the approval could not be asked ({type(exc).__name__}: {exc}); not run",
                )
            if decision == "deny":
                result = ToolResult(False, refusal)
                self._append_result(call["id"], result)
                yield ToolCallFinished(call["id"], name, False, result.content, 0.0, False)
                return
            if decision == "always":
                self.policy.always_allowed.add(name)
            elif isinstance(decision, EditedArguments):
                arguments = decision.arguments
                # What ran is what the session records, so a resumed session tells the truth.
                fn["arguments"] = json.dumps(arguments, ensure_ascii=False)
                self._save()
        yield Status("tool", name)
        result = await self._interruptible(self.tools.call(name, arguments))
        self._append_result(call["id"], result)
        yield ToolCallFinished(
            call["id"], name, result.ok, result.content, result.duration_s, result.truncated
        )

    def _append_result(self, call_id: str, result: ToolResult) -> None:
        self.session.messages.append({"role": "tool", "tool_call_id": call_id, "content": result.content})
        self._save()

    async def aclose(self) -> None:
        """Stop MCP servers and close the HTTP client."""
        self.cancel()
        await self.tools.aclose()
        await self.client.aclose()
