"""Generation backends behind the HTTP layer: the native engine, or a vLLM/SGLang server.

Both take a prompt (text already encoded with dsv's chat encoding, or token ids) and stream
:class:`Piece` objects of decoded text. The HTTP layer owns everything above that (chat encoding,
parsing, stop strings, the OpenAI shapes), so clients see the same API whichever engine runs.

- :class:`LocalBackend` runs :class:`~dsv.serve.engine.Engine` (in its own process through
  :class:`~dsv.serve.worker.EngineProcess`, or in a thread of this one); closing the stream
  early (client gone, stop string, timeout) cancels the sequence and frees its cache blocks. It
  installs the engine's per-step ``deliver`` hook: each engine step wakes an event loop once (one
  ``call_soon_threadsafe`` for all its streams), and token strings for logprobs are only decoded
  when the request asked for logprobs.
- :class:`ProxyBackend` forwards to an engine's ``/v1/completions`` (streaming, special tokens
  kept so ``</think>`` and DSML survive) and reads its server-sent events. Sampling settings are
  forwarded; ``prefix_choices`` is not (the engines' constrained-decoding options differ by
  version), so there the model's own tokens stand.

Run the checks: ``pytest packages/serve/tests/test_serve_proxy.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from dsv.core.chat import Templates
from dsv.core.tokenizer import IncrementalDetokenizer
from dsv.serve.engine import Engine, Finish, GenParams, PromptLogprobs, TokenEvent

if TYPE_CHECKING:
    from dsv.serve.worker import EngineProcess

__all__ = ["Backend", "IncrementalDetokenizer", "LocalBackend", "Piece", "ProxyBackend", "TokenLogprob"]


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Piece:
    """A stretch of generated text; the last piece carries ``finish_reason`` and usage.

    ``tokens`` counts the generated tokens the piece covers (``logprobs`` is only filled when the
    request asked for logprobs; ``ids`` are their ids where the backend knows them).
    ``prompt_logprobs`` (``GenParams.prompt_logprobs``) comes once, before the first token: one
    entry per prompt token after the first. The last piece's ``cached_tokens`` counts the prompt
    tokens served from the prefix cache.
    """

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""
    ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob] | None = None


class Backend(Protocol):
    templates: Templates
    max_model_len: int
    vocab_size: int  # token ids the model takes: 0 .. vocab_size - 1

    def encode(self, text: str) -> list[int]: ...

    def count(self, prompt: str | list[int]) -> int: ...

    def decode(self, ids: list[int]) -> str: ...

    def stream(
        self, prompt: str | list[int], params: GenParams, *, ignore_eos: bool = False,
        skip_special_tokens: bool = False,
    ) -> AsyncIterator[Piece]: ...  # fmt: skip

    def stats(self) -> dict[str, float]: ...

    def close(self) -> None: ...


class _Sink:
    """A stream's engine callback: puts events on its asyncio queue, from the engine thread."""

    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[TokenEvent | Finish]) -> None:
        self.loop, self.queue = loop, queue

    def __call__(self, ev: TokenEvent | Finish) -> None:  # used only when no deliver hook is installed
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)


def _put_all(items: list[tuple[asyncio.Queue[TokenEvent | Finish], TokenEvent | Finish]]) -> None:
    for queue, ev in items:
        queue.put_nowait(ev)


class _Tokens:
    """Text <-> ids with the checkpoint's tokenizer (no BOS: prompts are already encoded)."""

    tokenizer: Any

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_bos=False))

    def ids(self, prompt: str | list[int]) -> list[int]:
        return list(prompt) if isinstance(prompt, list) else self.encode(prompt)

    def count(self, prompt: str | list[int]) -> int:
        return len(prompt) if isinstance(prompt, list) else len(self.encode(prompt))

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids))


class LocalBackend(_Tokens):
    """The native engine with the checkpoint's tokenizer."""

    def __init__(
        self,
        engine: Engine | EngineProcess,
        tokenizer: Any,
        *,
        templates: Templates,
        max_model_len: int,
        vocab_size: int,
    ) -> None:
        self.engine, self.tokenizer, self.templates = engine, tokenizer, templates
        self.max_model_len, self.vocab_size = max_model_len, vocab_size
        self.eos_id: int = tokenizer.eos_id
        engine.deliver = self._deliver

    @staticmethod
    def _deliver(batch: list[tuple[Any, TokenEvent | Finish]]) -> None:
        """Engine thread, once per step: one loop wake-up carries every stream's events."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, TokenEvent | Finish]]] = {}
        for callback, ev in batch:
            if isinstance(callback, _Sink):
                by_loop.setdefault(callback.loop, []).append((callback.queue, ev))
            else:
                callback(ev)
        for loop, items in by_loop.items():
            # A closed loop has nobody left to read these streams.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_put_all, items)

    def stats(self) -> dict[str, float]:
        s = self.engine.stats()
        return {
            "waiting": s.waiting,
            "running": s.running,
            "used_blocks": s.used_blocks,
            "cached_blocks": s.cached_blocks,
            "num_blocks": s.num_blocks,
            "prefix_hit_blocks": s.prefix_hit_blocks,
            "preemptions": s.preemptions,
        }

    def close(self) -> None:
        self.engine.stop()

    async def stream(
        self, prompt: str | list[int], params: GenParams, *, ignore_eos: bool = False,
        skip_special_tokens: bool = False,
    ) -> AsyncIterator[Piece]:  # fmt: skip
        """Generate from ``prompt``; the end-of-sequence token stops it unless ``ignore_eos``; stop
        tokens never reach the text, nor do special tokens with ``skip_special_tokens``."""
        queue: asyncio.Queue[TokenEvent | PromptLogprobs | Finish] = asyncio.Queue()
        ids = self.ids(prompt)
        if not ignore_eos:
            params = GenParams(**{**params.__dict__, "stop_token_ids": (*params.stop_token_ids, self.eos_id)})
        stops = params.stop_token_ids
        # The HTTP layer checks requests first; an engine refusal still ends the choice cleanly.
        try:
            sid = self.engine.submit(ids, params, _Sink(asyncio.get_running_loop(), queue))
        except ValueError as e:
            yield Piece(finish_reason="error", prompt_tokens=len(ids), error=str(e))
            return
        done = False
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=skip_special_tokens)
        decode = self.tokenizer.decode
        want_lp = params.top_logprobs > 0
        try:
            while True:
                # Under load several tokens queue up between wake-ups: send them as one piece.
                events = [await queue.get()]
                while not queue.empty() and not isinstance(events[-1], Finish):
                    events.append(queue.get_nowait())
                text: list[str] = []
                lps: list[TokenLogprob] = []
                got: list[int] = []
                n = 0
                for ev in events:
                    if isinstance(ev, PromptLogprobs):
                        yield Piece(prompt_logprobs=[
                            TokenLogprob(decode([t]), v, [(decode([a]), w) for a, w in top])
                            for t, v, top in zip(ids[1:], ev.logprobs, ev.top, strict=True)
                        ])  # fmt: skip
                        continue
                    if isinstance(ev, Finish):
                        done = True
                        text.append(detok.flush())
                        yield Piece(
                            text="".join(text),
                            logprobs=lps,
                            tokens=n,
                            finish_reason=ev.reason,
                            prompt_tokens=ev.prompt_tokens,
                            completion_tokens=ev.completion_tokens,
                            error=ev.error,
                            ids=got,
                            cached_tokens=ev.cached_tokens,
                        )
                        return
                    n += 1
                    got.append(ev.token)
                    if want_lp:
                        lps.append(
                            TokenLogprob(
                                decode([ev.token]), ev.logprob, [(decode([t]), v) for t, v in ev.top]
                            )
                        )
                    if ev.token not in stops:
                        text.append(detok.push(ev.token))
                yield Piece(text="".join(text), logprobs=lps, tokens=n, ids=got)
        finally:
            if not done:
                self.engine.cancel(sid)


class ProxyBackend(_Tokens):
    """Forward encoded prompts to a vLLM/SGLang ``/v1/completions`` endpoint."""

    def __init__(
        self,
        base_url: str,
        model: str,
        tokenizer: Any,
        *,
        templates: Templates,
        max_model_len: int,
        vocab_size: int,
        api_key: str | None = None,
    ) -> None:
        import httpx

        self.base_url, self.model, self.tokenizer = base_url.rstrip("/"), model, tokenizer
        self.templates, self.max_model_len, self.vocab_size = templates, max_model_len, vocab_size
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=None)
        self._inflight = 0

    def stats(self) -> dict[str, float]:
        return {"waiting": 0, "running": self._inflight}

    def close(self) -> None:
        pass

    async def stream(
        self, prompt: str | list[int], params: GenParams, *, ignore_eos: bool = False,
        skip_special_tokens: bool = False,
    ) -> AsyncIterator[Piece]:  # fmt: skip
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            "stream_options": {"include_usage": True},
            # Both engines accept these extensions; special tokens must survive for the parser.
            "skip_special_tokens": skip_special_tokens,
            "spaces_between_special_tokens": False,
        }
        if params.top_k:
            body["top_k"] = params.top_k
        if params.seed is not None:
            body["seed"] = params.seed
        if params.top_logprobs:
            body["logprobs"] = params.top_logprobs
        if params.penalised:
            body["presence_penalty"] = params.presence_penalty
            body["frequency_penalty"] = params.frequency_penalty
        if params.logit_bias:
            body["logit_bias"] = {str(t): b for t, b in params.logit_bias}
        # vLLM's extensions (SGLang takes the same names).
        for name, unset in (("min_p", 0.0), ("repetition_penalty", 1.0), ("min_tokens", 0)):
            if getattr(params, name) != unset:
                body[name] = getattr(params, name)
        if params.stop_token_ids:
            body["stop_token_ids"] = list(params.stop_token_ids)
        if ignore_eos:
            body["ignore_eos"] = True
        finish: str | None = None
        usage: dict[str, int] = {}
        self._inflight += 1
        try:
            async with self._client.stream("POST", "/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    detail = (await resp.aread()).decode(errors="replace")[:500]
                    yield Piece(finish_reason="error", error=f"engine returned {resp.status_code}: {detail}")
                    return
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or []:
                        lps = _proxy_logprobs(choice.get("logprobs"))
                        if choice.get("text") or lps:
                            yield Piece(text=choice.get("text") or "", logprobs=lps, tokens=len(lps) or 1)
                        finish = choice.get("finish_reason") or finish
        finally:
            self._inflight -= 1
        yield Piece(
            finish_reason=finish or "stop",
            prompt_tokens=int(usage.get("prompt_tokens", 0)) or self.count(prompt),
            completion_tokens=int(usage.get("completion_tokens", 0)),
        )


def _proxy_logprobs(lp: dict[str, Any] | None) -> list[TokenLogprob]:
    if not lp or not lp.get("tokens"):
        return []
    tops = lp.get("top_logprobs") or [None] * len(lp["tokens"])
    return [
        TokenLogprob(
            tok, float(v if v is not None else 0.0), sorted((top or {}).items(), key=lambda kv: -kv[1])
        )
        for tok, v, top in zip(lp["tokens"], lp.get("token_logprobs") or [], tops, strict=False)
    ]
