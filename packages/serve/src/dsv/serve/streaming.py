"""The generation side of a request: one choice's stream of engine pieces into API events, and the
fan-in of a request's choices.

:func:`run_choice` reads the backend's pieces for one choice: stop strings (:class:`StopScanner`,
held back while a stop could still begin), the chat parser's deltas, reasoning tokens (up to the
first ``</think>``), latency metrics and the final usage, as :class:`ChoiceEvent` objects on a
queue. :func:`fan_in` runs a request's choices concurrently and yields their events, ending all
of them on a client disconnect, the request deadline or a failed choice. :func:`tracked` keeps
the in-flight count right however a stream ends. A new endpoint that generates text builds its
jobs with ``run_choice`` and reads them with ``fan_in``.

Run the checks: ``pytest packages/serve/tests``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request

from dsv.core.chat import ChatDelta, StreamParser, partial_call
from dsv.serve.backend import Backend, TokenLogprob
from dsv.serve.engine import GenParams
from dsv.serve.schemas import APIError

if TYPE_CHECKING:
    from dsv.serve.state import ServerState

__all__ = ["ChoiceEvent", "Extras", "StopScanner", "chat_logprob", "fan_in", "run_choice", "tracked", "usage",
           "vllm_prompt_logprobs"]  # fmt: skip


class StopScanner:
    """Cut generated text at the first stop string (after it with ``include``, vLLM's
    ``include_stop_str_in_output``), holding back a possible stop prefix."""

    def __init__(self, stops: list[str], include: bool = False) -> None:
        self.stops, self.buf, self.stopped, self.include = stops, "", False, include

    def feed(self, text: str, final: bool = False) -> str:
        if not self.stops:
            return text
        self.buf += text
        hits = [(self.buf.find(s), s) for s in self.stops if s in self.buf]
        if hits:
            pos, stop = min(hits)
            end = pos + len(stop) if self.include else pos
            out, self.buf, self.stopped = self.buf[:end], "", True
            return out
        keep = (
            0
            if final
            else max((n for s in self.stops for n in range(1, len(s)) if self.buf.endswith(s[:n])), default=0)
        )
        out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
        return out


@dataclass
class _Alarm:
    """What the request watchdog found: ``timeout``, ``disconnect`` or ``failed`` (with ``exc``)."""

    kind: str
    exc: BaseException | None = None


@dataclass
class ChoiceEvent:
    index: int
    deltas: list[ChatDelta]
    text: str
    logprobs: list[TokenLogprob]
    finish: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class Extras:
    """What a choice asks of the backend and the text layer beyond ``GenParams``."""

    stops: list[str]
    include_stop: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = False
    thinking: bool = False  # count reasoning tokens (up to the first ``</think>``)


def usage(prompt_tokens: int, events: Iterable[ChoiceEvent]) -> dict[str, Any]:
    """OpenAI's usage object, with the reasoning and prefix-cached token counts."""
    done = list(events)
    completion = sum(e.completion_tokens for e in done)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": max((e.cached_tokens for e in done), default=0)},
        "completion_tokens_details": {"reasoning_tokens": sum(e.reasoning_tokens for e in done)},
    }



async def run_choice(
    srv: ServerState, index: int, prompt: str | list[int], params: GenParams, extras: Extras,
    parser: StreamParser | None, forced: str, out: asyncio.Queue[ChoiceEvent], one_call: bool = False,
) -> None:  # fmt: skip
    """Generate one choice into ``out``; ``one_call`` ends it after its first complete tool call
    (``parallel_tool_calls: false``): later text is dropped and the engine stops at once."""
    scanner = StopScanner(extras.stops, extras.include_stop)
    start, last = time.monotonic(), None
    stream = srv.backend.stream(prompt, params, ignore_eos=extras.ignore_eos,
                            skip_special_tokens=extras.skip_special_tokens)  # fmt: skip
    finish = None
    generated = 0  # the engine's count arrives with its last piece; a stop string ends earlier
    # Reasoning tokens: up to and including the first `</think>` (by id when the srv.backend reports
    # ids, else by the pieces the parser still reads as reasoning).
    reasoning, thinking = 0, extras.thinking
    end_ids = srv.backend.encode(srv.backend.templates.thinking_end_token) if thinking else []
    end_id = end_ids[0] if len(end_ids) == 1 else None
    seen, calls = forced, 0  # the turn's text so far and its calls, for a call the limit cuts
    try:
        if forced and parser is not None:
            await out.put(ChoiceEvent(index, parser.feed(forced), "", []))
        async for piece in stream:
            if piece.prompt_logprobs is not None:
                await out.put(ChoiceEvent(index, [], "", [], prompt_logprobs=piece.prompt_logprobs))
            if thinking and piece.ids and end_id is not None:
                for t in piece.ids:
                    reasoning += 1
                    if t == end_id:
                        thinking = False
                        break
            elif thinking:
                reasoning += piece.tokens
            text = scanner.feed(piece.text, final=piece.finish_reason is not None)
            now = time.monotonic()
            if piece.tokens or piece.text:
                if last is None:
                    srv.metrics.first_token(now - start)
                else:
                    srv.metrics.next_token(now - last)
                last = now
                srv.metrics.generated(piece.tokens or 1)
                srv.tps_window.append((now, piece.tokens or 1))
            generated += piece.tokens
            deltas = parser.feed(text) if parser is not None else []
            if thinking and end_id is None and any(d.kind != "reasoning" for d in deltas):
                thinking = False
            called = (
                next((k for k, d in enumerate(deltas) if d.kind == "tool_call"), None)
                if one_call
                else None
            )
            if called is not None:
                finish = "stop"
                await out.put(ChoiceEvent(index, deltas[: called + 1], text, piece.logprobs, finish,
                                           piece.prompt_tokens, generated, reasoning_tokens=reasoning,
                                           cached_tokens=piece.cached_tokens))  # fmt: skip
                return
            if piece.finish_reason is not None:
                srv.metrics.prefix_lookup(piece.prompt_tokens, piece.cached_tokens)
            if piece.finish_reason is not None or scanner.stopped:
                if parser is not None:
                    deltas += parser.finish()
                finish = "stop" if scanner.stopped else piece.finish_reason
                if parser is not None and finish == "length":
                    # The parser drops a call the limit cut; return what it holds instead.
                    cut = partial_call(seen + text, srv.backend.templates, index=calls, id_prefix=parser.id_prefix)
                    if cut is not None:
                        deltas.append(cut)
                used = piece.completion_tokens if piece.finish_reason is not None else generated
                await out.put(ChoiceEvent(index, deltas, text, piece.logprobs, finish, piece.prompt_tokens,
                                           used, piece.error, min(reasoning, used), piece.cached_tokens))  # fmt: skip
                return
            seen += text
            calls += sum(d.kind == "tool_call" for d in deltas)
            await out.put(ChoiceEvent(index, deltas, text, piece.logprobs))
    finally:
        srv.metrics.finished.labels(finish or "cancelled").inc()
        srv.metrics.duration.observe(time.monotonic() - start)
        await stream.aclose()  # cancels the sequence in the engine when it is still running

async def fan_in(srv: ServerState, jobs: list[Any], request: Request, stream: bool) -> AsyncIterator[ChoiceEvent]:
    """Run the choices concurrently; yield their events; cancel all on disconnect or timeout.

    Events are awaited with a plain ``Queue.get`` (no per-event timeout task); a watchdog wakes
    every half second to enforce the deadline, notice a gone client and surface a failed job.
    """
    out: asyncio.Queue[ChoiceEvent | _Alarm] = asyncio.Queue()
    tasks = [asyncio.create_task(j(out)) for j in jobs]
    remaining = len(tasks)
    deadline = time.monotonic() + srv.settings.request_timeout_s

    async def watchdog() -> None:
        while True:
            # The deadline holds while tokens keep coming too, not only when the engine is silent.
            await asyncio.sleep(max(0.0, min(0.5, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                out.put_nowait(_Alarm("timeout"))
                return
            if await request.is_disconnected():
                out.put_nowait(_Alarm("disconnect"))
                return
            for t in tasks:
                exc = t.exception() if t.done() and not t.cancelled() else None
                if exc is not None:
                    out.put_nowait(_Alarm("failed", exc))
                    return

    guard = asyncio.create_task(watchdog())
    try:
        while remaining:
            ev = await out.get()
            if isinstance(ev, _Alarm):
                if ev.kind == "timeout":
                    raise APIError(408, f"request took longer than {srv.settings.request_timeout_s} s",
                                   type="timeout_error", code="request_timeout")  # fmt: skip
                if ev.kind == "disconnect":
                    return
                assert ev.exc is not None
                raise ev.exc from None
            if ev.finish is not None:
                remaining -= 1
            yield ev
    finally:
        guard.cancel()
        for t in tasks:
            t.cancel()
        await asyncio.gather(guard, *tasks, return_exceptions=True)



async def tracked(srv: ServerState, gen: AsyncIterator[str]) -> AsyncIterator[str]:
    """Decrement the in-flight count when a stream ends, however it ends (done, error, disconnect)."""
    try:
        async for item in gen:
            yield item
    finally:
        srv.in_flight -= 1
        await gen.aclose()  # type: ignore[attr-defined]




def vllm_prompt_logprobs(
    prompt: str | list[int], entries: list[TokenLogprob], backend: Backend
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs``: null for the first token, then per token ``{id: {"logprob",
    "rank", "decoded_token"}}`` (rank among the alternatives reported, 1 = most likely)."""
    ids = prompt if isinstance(prompt, list) else backend.encode(prompt)
    out: list[dict[str, dict[str, Any]] | None] = [None]
    for tid, e in zip(ids[1:], entries, strict=False):
        rank = 1 + sum(1 for _, v in e.top if v > e.logprob)
        out.append({str(tid): {"logprob": e.logprob, "rank": rank, "decoded_token": e.token}})
    return out


def chat_logprob(e: TokenLogprob) -> dict[str, Any]:
    return {
        "token": e.token,
        "logprob": e.logprob,
        "bytes": list(e.token.encode()),
        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in e.top],
    }


