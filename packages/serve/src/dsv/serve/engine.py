"""The native serving engine: continuous batching with chunked prefill over a paged cache.

One background thread owns the model. Each iteration it

1. drops cancelled sequences (their blocks go back to the pool at once),
2. admits waiting requests while blocks and batch slots allow (prefix-cache hits skip prefill; a
   prompt whose next blocks another prompt is prefilling right now waits for them, so n > 1
   choices or one system prompt sent by many clients at once are prefilled once); a request takes
   the blocks of its prompt and first token, and one more each time its output crosses a block
   boundary. When the pool is out of blocks the newest running request is preempted: its blocks
   go back, and it waits at the head of the queue to be recomputed (prefill of its prompt and its
   output so far; its prompt blocks usually come back from the prefix cache) and then goes on, so
   no request fails because others are long (``EngineStats.preemptions`` counts them),
3. runs one prefill forward: the next chunk (at most ``prefill_chunk`` tokens) of the waiting
   prompts whose chunk has the same length, batched up to ``prefill_budget`` tokens, so many new
   requests start together and long prompts never stall decoding for long, and
4. runs one decode forward for every sequence whose prompt is cached (B=running, S=1).

Prefill reads and writes the paged pool. When a prompt is done, its rows are copied once into a
row of the :class:`~dsv.serve.paged_cache.DecodeStaging` buffer and the sequence decodes from
there: decode batches are the packed rows ``0..n-1`` in row order, so the model sees a view of the
past and each step copies only the new token's rows (``staging=False`` decodes from the pool with
a gather per layer instead).

The model sees a :class:`~dsv.serve.paged_cache.PagedBatchView` as its ``KVCache``; DSA sparse
decode and kernels happen inside the model through the core dispatch. Greedy rows are sampled in
one argmax; other rows through :func:`dsv.core.generate.sample_next`, one by one because each
request has its own parameters and seeded generator. A request's ``logit_bias`` and its
presence/frequency penalties (over the tokens generated so far; :mod:`dsv.core.generate`'s
``apply_logit_bias`` and ``apply_penalties``) and its ``prefix_choices`` (the output must begin,
or continue after ``prefix_after``, with one of these token sequences: the other tokens are masked
until one is complete) change what is sampled, not the reported logprobs: those are the model's
own log-softmax, before bias, penalties, constraints, temperature and filtering.
``GenParams`` are checked when built (the sampling rules' own checks, finite numbers, 64-bit
seeds); a request whose sampling still fails ends with an error by itself, and a forward that
raises is run again row by row, so only the request that causes it ends with the error. vLLM's
``min_p``, ``repetition_penalty`` and ``min_tokens`` apply to the same copy of the logits as the
penalties; ``GenParams.grammar`` (:mod:`dsv.serve.grammar`) masks, each step, the tokens that
would leave the output's grammar, from its start or from just after ``grammar_after`` (the
reasoning stays free until ``</think>``); ``prompt_logprobs`` reports the prompt's own logprobs
(a ``PromptLogprobs`` event before the first token).

Events go back through each request's callback. With ``deliver`` set, the events of one iteration
are handed over as ONE list at its end instead (``deliver([(callback, event), ...])``): a server
then wakes its event loop once per step, not once per token, which keeps the loop thread from
taking the GIL away from the model between every pair of torch ops.

What RL rollouts need (``GenParams(record=True)``, per request): each token's logprob under the
sampling distribution and the ids the sampler could have drawn (``TokenEvent.sample_logprob`` and
``kept``: Keep Sampling Mask), and on ``Finish`` the MoE routes of every position a training
forward over ``prompt + tokens[:-1]`` sees (``Finish.routes``: Keep Routing). The model is asked
for routes only in forwards that hold a recording sequence. Prompt blocks from the prefix cache
(shared prefill of the G samples of one prompt included) bring their routes along: the pool keeps
them per cached block, and a recording request reuses only cached blocks that have them.

New weights (:meth:`Engine.update_weights`) go in between iterations. The rule: requests running
when an update arrives finish on the old weights; no request is admitted while it waits; the
weights are copied once nothing runs, the prefix cache is dropped (its rows came from the old
weights) and the requests still queued start on the new ones. :meth:`Engine.generate_many` is the
blocking call for in-process callers (RL, eval), with or without the engine thread.

Run the checks: ``pytest packages/serve/tests/test_serve_engine.py
packages/serve/tests/test_serve_engine_rl.py``.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dsv.serve.grammar import GrammarVocab, Matcher, fill_masks
from dsv.serve.paged_cache import BlockPool, DecodeStaging, PagedBatchView, prefix_keys

__all__ = ["Completion", "Engine", "EngineStats", "Finish", "GenParams", "PromptLogprobs", "TokenEvent"]


@dataclass(frozen=True, kw_only=True)
class GenParams:
    """Per-request sampling settings."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 256
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    top_logprobs: int = 0  # alternatives reported per token (0: only the chosen token's logprob)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs
    # The output begins with one of these token sequences (e.g. the names a forced tool call may
    # take); each step only the tokens that continue one of them are allowed until one is complete.
    prefix_choices: tuple[tuple[int, ...], ...] = ()
    # When set, the choices apply from just after the first time the output ends with this sequence
    # (e.g. ``</think>``: a forced tool call after the reasoning) instead of from its start.
    prefix_after: tuple[int, ...] = ()
    # Record what an RL update replays: TokenEvent.sample_logprob and .kept, Finish.routes.
    record: bool = False
    # vLLM's sampling extensions: drop tokens under ``min_p`` times the top token's probability
    # (after temperature); HF/vLLM's multiplicative penalty on tokens of the prompt and the output;
    # the stop tokens masked until ``min_tokens`` tokens are generated.
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    # A grammar (``dsv.serve.grammar``'s text form) the output follows token by token, from its
    # start or from just after the first time it ends with ``grammar_after`` (``</think>``).
    grammar: str = ""
    grammar_after: tuple[int, ...] = ()
    # Report the prompt's own logprobs (with this many alternatives per position) before the first
    # token: a PromptLogprobs event. Such a prompt is prefilled in full (no prefix-cache reuse).
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        from dsv.core.generate import SamplingParams

        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p",
                     "repetition_penalty"):  # fmt: skip
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        # The sampling rules' own checks (temperature, top_p, top_k, penalties), then the rest.
        SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                       presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty)  # fmt: skip
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {self.top_logprobs}")
        for token, bias in self.logit_bias:
            if token < 0 or not -100 <= bias <= 100:
                raise ValueError(
                    f"logit_bias takes token ids >= 0 and biases in [-100, 100], got {token}: {bias}"
                )
        for choice in self.prefix_choices:
            if not choice or min(choice) < 0:
                raise ValueError(
                    f"prefix_choices must be non-empty sequences of token ids >= 0, got {choice}"
                )
        if self.prefix_after and (not self.prefix_choices or min(self.prefix_after) < 0):
            raise ValueError("prefix_after takes token ids >= 0 and needs prefix_choices")
        if self.grammar_after and (not self.grammar or min(self.grammar_after) < 0):
            raise ValueError("grammar_after takes token ids >= 0 and needs a grammar")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed must fit in 64 bits, got {self.seed}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ValueError(f"prompt_logprobs must be >= 0, got {self.prompt_logprobs}")

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    @functools.cached_property
    def leaves_logits(self) -> bool:
        """Whether sampling uses the model's logits as they are: no bias, penalty, mask or grammar."""
        return not (
            self.logit_bias or self.penalised or self.prefix_choices or self.grammar
            or self.repetition_penalty != 1 or (self.min_tokens and self.stop_token_ids)
            or (self.min_p > 0 and self.temperature > 0)
        )  # fmt: skip

    def allowed_next(self, generated: list[int]) -> set[int] | None:
        """Tokens that may follow ``generated`` under ``prefix_choices``; None when unconstrained
        (no choices, or one of them is already complete)."""
        n = len(generated)
        allowed: set[int] = set()
        for choice in self.prefix_choices:
            if len(choice) <= n:
                if tuple(generated[: len(choice)]) == choice:
                    return None
            elif tuple(generated) == choice[:n]:
                allowed.add(choice[n])
        return allowed or None


@dataclass(frozen=True)
class TokenEvent:
    """One generated token. ``logprob`` and ``top`` are the model's own log-softmax.

    With ``GenParams.record``: ``sample_logprob`` is the token's log-probability under the
    distribution it was drawn from (``SampleResult.logprobs`` of :func:`dsv.core.generate.sample_next`:
    temperature applied, renormalised over the kept set; 0.0 for greedy rows) and ``kept`` the ids
    the sampler could have drawn (1-D int64, sorted, CPU), or None for every token: only when
    ``temperature > 0``, ``top_p == 1``, ``top_k == 0`` and no ``prefix_choices`` mask applied.
    Logit bias and penalties shift the distribution these describe (a training forward does not
    see them), so RL rollouts leave them off.
    """

    token: int
    logprob: float
    top: list[tuple[int, float]]
    sample_logprob: float | None = None
    kept: torch.Tensor | None = None


@dataclass(frozen=True)
class PromptLogprobs:
    """The prompt's own logprobs (``GenParams.prompt_logprobs``), sent before the first token: for
    prompt positions 1..P-1 the model's log-softmax of that token given the ones before it, and
    the ``top`` alternatives asked for. Position 0 has none (nothing predicts it)."""

    logprobs: list[float]
    top: list[list[tuple[int, float]]]


@dataclass(frozen=True)
class Finish:
    """The end of a request. With ``GenParams.record``, ``routes`` holds one entry per model layer
    (MTP layers excluded; None for dense layers): the MoE expert ids ``[P + C - 1, k]`` (int64, CPU)
    of the P prompt tokens and the first C - 1 of the C generated ones, in order: what a training
    forward over ``prompt + tokens[:-1]`` takes as ``forced_routes`` once a batch dim is added."""

    reason: str  # "stop" | "length" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: str = ""
    routes: list[torch.Tensor | None] | None = None
    cached_tokens: int = 0  # prompt tokens whose cache rows came from the prefix cache


@dataclass
class Completion:
    """One request's result from :meth:`Engine.generate_many` (the recorded fields with
    ``GenParams.record``, else None)."""

    tokens: list[int]
    logprobs: list[float]  # the model's own
    sample_logprobs: list[float] | None
    kept: list[torch.Tensor | None] | None
    routes: list[torch.Tensor | None] | None
    finish_reason: str
    error: str
    prompt_tokens: int
    prompt_logprobs: list[float] | None = None  # with GenParams.prompt_logprobs: positions 1..P-1


Event = TokenEvent | PromptLogprobs | Finish


def _repetition_penalty(logits: torch.Tensor, seq: _Seq, penalty: float) -> torch.Tensor:
    """HF/vLLM's repetition penalty: the logit of every token of the prompt or the output so far is
    divided by ``penalty`` when positive and multiplied by it when negative (a new tensor)."""
    if seq.seen is None:
        seq.seen = set(seq.prompt) | set(seq.generated)
    ids = torch.tensor(sorted(seq.seen), dtype=torch.long, device=logits.device)
    out = logits.clone()
    v = out[ids]
    out[ids] = torch.where(v > 0, v / penalty, v * penalty)
    return out

# A recording sequence's per-step routes are concatenated every this many forwards: one small
# tensor per layer per step would otherwise pile up (60 layers x 8k tokens = 480k tensors).
_MERGE_ROUTES_EVERY = 64


@dataclass(eq=False)  # a request is its identity: `seq in running` must not compare 512-token prompts
class _Seq:
    id: int
    prompt: list[int]
    params: GenParams
    on_event: Callable[[Event], None]
    generator: torch.Generator
    keys: list[bytes]
    blocks: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose rows are in the cache
    generated: list[int] = field(default_factory=list)
    row: int | None = None  # its row in the decode staging buffer, once decoding
    counts: Counter[int] = field(default_factory=Counter)  # generated tokens, when penalised
    choice_from: int | None = None  # where the prefix_choices constraint starts, once it has
    choice_done: bool = False  # a choice is complete (or there are none): no more masking
    # With params.record: per forward (or cached prompt block), the per-layer routes of its positions.
    route_chunks: list[list[torch.Tensor | None]] = field(default_factory=list)
    matcher: Matcher | None = None  # with params.grammar
    grammar_from: int | None = None  # where the grammar starts, once it has
    seen: set[int] | None = None  # prompt and output tokens, with a repetition penalty
    reused: int = 0  # prompt tokens taken from the prefix cache
    # What prefill computes: the prompt, or after a preemption the prompt and the tokens generated
    # so far (recompute); set at submit.
    fill: list[int] = field(default_factory=list)
    admitted: int = 0  # admission order: the newest running request is preempted first
    prompt_lp_sent: bool = False
    prompt_lps: list[float] = field(default_factory=list)  # with params.prompt_logprobs
    prompt_top: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated


class _Collect:
    """A :meth:`Engine.generate_many` request's callback: gathers its events into a Completion."""

    def __init__(self, record: bool) -> None:
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.sample_logprobs: list[float] | None = [] if record else None
        self.kept: list[torch.Tensor | None] | None = [] if record else None
        self.finish: Finish | None = None
        self.prompt_logprobs: list[float] | None = None
        self.done = threading.Event()

    def __call__(self, ev: Event) -> None:
        if isinstance(ev, Finish):
            self.finish = ev
            self.done.set()
            return
        if isinstance(ev, PromptLogprobs):
            self.prompt_logprobs = ev.logprobs
            return
        self.tokens.append(ev.token)
        self.logprobs.append(ev.logprob)
        if self.sample_logprobs is not None and self.kept is not None:
            self.sample_logprobs.append(ev.sample_logprob)  # type: ignore[arg-type]
            self.kept.append(ev.kept)

    def completion(self) -> Completion:
        f = self.finish
        assert f is not None, "the request has not finished"
        return Completion(
            tokens=self.tokens,
            logprobs=self.logprobs,
            sample_logprobs=self.sample_logprobs,
            kept=self.kept,
            routes=f.routes,
            finish_reason=f.reason,
            error=f.error,
            prompt_tokens=f.prompt_tokens,
            prompt_logprobs=self.prompt_logprobs,
        )


@dataclass
class _WeightUpdate:
    """New parameter values waiting for the engine thread (``pairs``: model tensor, new value)."""

    pairs: list[tuple[torch.Tensor, torch.Tensor]]
    done: threading.Event = field(default_factory=threading.Event)
    version: int = 0
    error: BaseException | None = None


@dataclass
class EngineStats:
    waiting: int = 0
    running: int = 0
    used_blocks: int = 0
    cached_blocks: int = 0
    num_blocks: int = 0
    generated_tokens: int = 0
    prefix_hit_blocks: int = 0
    preemptions: int = 0


class Engine:
    """Continuous-batching engine around a ``DSVForCausalLM``-like model (callable with ``cache=``).

    ``tokenizer`` (the checkpoint's :class:`dsv.core.tokenizer.Tokenizer`) is needed only by
    requests with a ``GenParams.grammar``; ``staging=False`` decodes from the pool's blocks, so
    ``num_blocks`` bounds the whole cache. ``staging_capacity=(rows, length)`` allocates the staging
    rows once at that size: a sequence decodes there while a row is free and it fits, and from the
    pool otherwise (a sequence that outgrows its row moves to its pool blocks), so the cache's memory
    is the pool plus that fixed size."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        num_layers: int,
        kv_dim: int,
        index_dim: int | None,
        num_blocks: int = 512,
        block_size: int = 16,
        max_batch: int = 64,
        prefill_chunk: int = 512,
        prefill_budget: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        staging: bool = True,
        vocab_size: int | None = None,
        share_prefill: bool = True,
        tokenizer: Any = None,
        staging_capacity: tuple[int, int] | None = None,
    ) -> None:
        sizes = {"num_blocks": num_blocks, "block_size": block_size, "max_batch": max_batch,
                 "prefill_chunk": prefill_chunk, "prefill_budget": 1 if prefill_budget is None else prefill_budget}  # fmt: skip
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        self.model = model
        self.pool = BlockPool(
            num_layers=num_layers,
            num_blocks=num_blocks,
            block_size=block_size,
            kv_dim=kv_dim,
            index_dim=index_dim,
            device=device,
            dtype=dtype,
        )
        # staging_capacity=(rows, length): staging rows allocated once, out of a server's cache budget;
        # None lets them grow with the batch and context.
        self.staging = (
            DecodeStaging(
                num_layers=num_layers, kv_dim=kv_dim, index_dim=index_dim, device=device, dtype=dtype,
                capacity=staging_capacity,
            )
            if staging
            else None
        )
        self._rows: list[_Seq] = []  # decoding sequences by staging row (packed: row i is _rows[i])
        self.max_batch, self.prefill_chunk, self.device = max_batch, prefill_chunk, torch.device(device)
        # prompt tokens per prefill forward
        self.prefill_budget = 4 * prefill_chunk if prefill_budget is None else prefill_budget
        self._ids = itertools.count()
        self._admissions = itertools.count()
        self.preemptions = 0  # requests preempted (recomputed later) because blocks ran out
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._cancel: set[int] = set()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.generated_tokens = 0
        self.vocab_size = vocab_size  # when known, submit() refuses ids the model does not have
        # A prompt whose next blocks another prompt is prefilling waits for them (see _admit); False
        # prefills every prompt's uncached blocks at once (no wait, more work).
        self.share_prefill = share_prefill
        # Per-iteration hand-over of events (see the module docstring); None calls callbacks directly.
        self.deliver: Callable[[list[tuple[Callable[[Event], None], Event]]], None] | None = None
        self._outbox: list[tuple[Callable[[Event], None], Event]] = []
        self.weights_version = 0  # bumped by every update_weights
        self._updates: list[_WeightUpdate] = []
        # The checkpoint's tokenizer (dsv.core.tokenizer.Tokenizer): grammars are compiled against it.
        self.tokenizer = tokenizer
        self._grammar_vocab: GrammarVocab | None = None

    @classmethod
    def for_model(cls, model: torch.nn.Module, config: object, **kwargs: object) -> Engine:
        """Engine sized from a ``ModelConfig`` (latent and indexer widths, layer count)."""
        return cls(
            model,
            num_layers=config.num_hidden_layers + config.num_nextn_predict_layers,  # type: ignore[attr-defined]
            kv_dim=config.kv_latent_dim,  # type: ignore[attr-defined]
            index_dim=config.index_head_dim if config.has_indexer else None,  # type: ignore[attr-defined]
            **{"vocab_size": config.vocab_size, **kwargs},  # type: ignore[attr-defined, arg-type]
        )

    # ----------------------------------------------------------------- client API (any thread)
    def blocks_needed(self, prompt_len: int, max_tokens: int) -> int:
        return -(-(prompt_len + max_tokens) // self.pool.block_size)

    def submit(self, prompt: list[int], params: GenParams, on_event: Callable[[Event], None]) -> int:
        """Queue a request; events arrive through ``on_event`` on the engine thread. Returns its id."""
        if not prompt:
            raise ValueError("empty prompt")
        if self.vocab_size is not None:
            for what, ids in (
                ("prompt", prompt),
                ("prefix_choices", (t for c in params.prefix_choices for t in c)),
                ("prefix_after", params.prefix_after),
            ):
                bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
                if bad is not None:
                    raise ValueError(
                        f"{what} token id {bad} is out of range: the model takes ids 0 to {self.vocab_size - 1}"
                    )
        if self.blocks_needed(len(prompt), params.max_tokens) > self.pool.num_blocks:
            raise ValueError("request needs more cache blocks than the pool holds")
        matcher = Matcher(self.grammar_vocab(), params.grammar) if params.grammar else None
        # On the model's device: multinomial draws with a generator on the logits' own device.
        g = torch.Generator(device=self.device)
        g.manual_seed(params.seed if params.seed is not None else int(time.time_ns()) & 0x7FFFFFFF)
        seq = _Seq(
            next(self._ids), list(prompt), params, on_event, g, prefix_keys(prompt, self.pool.block_size)
        )
        seq.matcher = matcher
        seq.fill = seq.prompt
        with self._cv:
            self._waiting.append(seq)
            self._cv.notify()
        return seq.id

    def grammar_vocab(self) -> GrammarVocab:
        """The tokenizer as the grammar engine sees it (built on first use)."""
        if self._grammar_vocab is None:
            if self.tokenizer is None:
                raise ValueError("grammar-constrained requests need an Engine built with tokenizer=")
            self._grammar_vocab = GrammarVocab.from_tokenizer(self.tokenizer, self.vocab_size)
        return self._grammar_vocab

    def cancel(self, seq_id: int) -> None:
        """Stop a request; its blocks are freed on the engine's next iteration (no more events)."""
        with self._cv:
            self._cancel.add(seq_id)
            self._cv.notify()

    def stats(self) -> EngineStats:
        with self._cv:
            return EngineStats(
                waiting=len(self._waiting),
                running=len(self._running),
                used_blocks=self.pool.used_blocks,
                cached_blocks=self.pool.cached_blocks,
                num_blocks=self.pool.num_blocks,
                generated_tokens=self.generated_tokens,
                prefix_hit_blocks=self.pool.prefix_hits,
                preemptions=self.preemptions,
            )

    def update_weights(self, state: Mapping[str, torch.Tensor]) -> int:
        """Copy new parameter values into the model and return the new ``weights_version``.

        ``state`` maps names of ``model.state_dict()`` (any subset) to tensors of the same shapes
        (other dtypes and devices are converted). With the engine thread running, the update
        waits until the requests running now have finished (on the old weights; nothing new is
        admitted meanwhile), is applied between two iterations, and this call blocks until then.
        Without the thread it is applied at once, and requests still running are an error (nothing
        would finish them while this call waits). Either way the prefix cache is dropped: its rows
        were computed with the old weights. Requests queued but not started run on the new ones.
        """
        own = self.model.state_dict()
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name, value in state.items():
            target = own.get(name)
            if target is None:
                raise ValueError(
                    f"update_weights: {name!r} is not a tensor of the engine's model "
                    f"(names are those of model.state_dict(), e.g. {next(iter(own))!r})"
                )
            if not isinstance(value, torch.Tensor):
                raise ValueError(
                    f"update_weights: {name!r} must be a torch.Tensor, got {type(value).__name__}"
                )
            if value.shape != target.shape:
                raise ValueError(
                    f"update_weights: {name!r} has shape {tuple(value.shape)}, the model's is {tuple(target.shape)}"
                )
            pairs.append((target, value.detach()))
        update = _WeightUpdate(pairs)
        if threading.current_thread() is self._thread:
            raise RuntimeError("update_weights cannot be called from the engine thread (an event callback)")
        if not self.alive:
            with self._cv:
                if self._running:
                    raise RuntimeError(
                        f"update_weights: {len(self._running)} requests are running and the engine thread is "
                        "not started; finish them first (generate_many or step() until they end)"
                    )
            self._apply_weights(update)
            return update.version
        with self._cv:
            self._updates.append(update)
            self._cv.notify()
        while not update.done.wait(0.5):
            if not self.alive:
                raise RuntimeError("the engine thread stopped before the new weights were applied")
        if update.error is not None:
            raise update.error
        return update.version

    def generate_many(
        self, prompts: Sequence[list[int]], params: GenParams | Sequence[GenParams]
    ) -> list[Completion]:
        """Run ``prompts`` (one ``GenParams`` for all, or one each) to the end; results in order.

        With the engine thread running this submits them and waits; without it, it drives the
        iterations in the calling thread until every one has finished.
        """
        each = [params] * len(prompts) if isinstance(params, GenParams) else list(params)
        if len(each) != len(prompts):
            raise ValueError(f"generate_many: {len(prompts)} prompts but {len(each)} GenParams")
        runs = [_Collect(p.record) for p in each]
        ids: list[int] = []
        try:
            for prompt, p, run in zip(prompts, each, runs, strict=True):
                ids.append(self.submit(prompt, p, run))
        except Exception:
            for seq_id in ids:
                self.cancel(seq_id)
            raise
        if self.alive:
            for run in runs:
                while not run.done.wait(0.5):
                    if not self.alive:
                        raise RuntimeError("the engine thread stopped before every request finished")
        else:
            with torch.inference_mode():
                while not all(run.done.is_set() for run in runs):
                    self._iterate()
        return [run.completion() for run in runs]

    def start(self) -> None:
        if self.device.type == "cpu":
            from dsv.core.attention import prepare_cpu_kernel

            prepare_cpu_kernel()  # its one-off build is not the first request's wait
        self._thread = threading.Thread(target=self._loop, name="dsv-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running."""
        return self._thread is not None and self._thread.is_alive()

    # ----------------------------------------------------------------- engine thread
    def _loop(self) -> None:
        # Inference mode, not just no-grad: no version counters or autograd metadata on any tensor,
        # which is a visible share of a small model's per-op cost.
        with torch.inference_mode():
            self._serve()

    def _serve(self) -> None:
        while True:
            with self._cv:
                while not (self._stop or self._waiting or self._running or self._cancel or self._updates):
                    self._cv.wait()
                if self._stop:
                    for seq in [*self._running, *self._waiting]:
                        self._finish(seq, "error", "server shutting down")
                    self._waiting.clear()
                    for update in self._updates:
                        update.error = RuntimeError("the engine stopped before the new weights were applied")
                        update.done.set()
                    self._updates.clear()
                    self._flush()
                    return
            self._iterate()

    def _iterate(self) -> None:
        """Drop cancelled requests, apply new weights once nothing runs, admit, step, hand over events."""
        with self._cv:
            self._drop_cancelled()
            updates: list[_WeightUpdate] = []
            if self._updates and not self._running:
                updates, self._updates = self._updates, []
        for update in updates:
            try:
                self._apply_weights(update)
            except Exception as e:  # reported to the caller of update_weights
                update.error = e
            update.done.set()
        with self._cv:
            self._admit()
        try:
            self.step()
        except Exception as e:  # keep serving: fail the batch, not the server
            with self._cv:
                for seq in list(self._running):
                    self._finish(seq, "error", f"{type(e).__name__}: {e}")
        self._flush()

    def _apply_weights(self, update: _WeightUpdate) -> None:
        # Outside inference mode: the parameters stay ordinary tensors a trainer may share.
        with torch.inference_mode(False), torch.no_grad():
            for target, value in update.pairs:
                target.copy_(value)
        with self._cv:
            self.pool.clear_prefix_cache()
            self.weights_version += 1
            update.version = self.weights_version

    def _emit(self, seq: _Seq, event: Event) -> None:
        if self.deliver is None:
            seq.on_event(event)
        else:
            self._outbox.append((seq.on_event, event))

    def _flush(self) -> None:
        if self._outbox and self.deliver is not None:
            batch, self._outbox = self._outbox, []
            self.deliver(batch)

    def _drop_cancelled(self) -> None:
        if not self._cancel:
            return
        for seq in [s for s in self._running if s.id in self._cancel]:
            self._running.remove(seq)
            self._free_row(seq)
            self.pool.release(seq.blocks)
        self._waiting = deque(s for s in self._waiting if s.id not in self._cancel)
        self._cancel.clear()

    def _admit(self) -> None:
        if self._updates and not any(s.generated for s in self._waiting):
            return  # new weights wait for the running requests; nothing new starts on the old ones
        # Prompts being prefilled now. A waiting prompt whose next uncached block one of them is
        # computing waits for it (n > 1 choices, a shared system prompt arriving at once): it is then
        # admitted with those blocks from the prefix cache instead of prefilling them again.
        # A recording prompt reuses only cached blocks that carry their routes, so it waits only for
        # a leader that records them.
        leaders = [s for s in self._running if s.cached < len(s.fill)] if self.share_prefill else []
        deferred: list[_Seq] = []
        while self._waiting and len(self._running) < self.max_batch:
            seq = self._waiting.popleft()
            if self._updates and not seq.generated:
                # Only preempted requests resume before new weights: they started on the old ones.
                deferred.append(seq)
                continue
            record = seq.params.record
            # Keep at least one prompt token to compute, so the first logits exist.
            keys = seq.keys[: (len(seq.fill) - 1) // self.pool.block_size]
            if seq.params.prompt_logprobs is not None and not seq.prompt_lp_sent:
                keys = []  # every prompt position's logits are needed: prefill it all
            have = self.pool.cached_prefix(keys, routed=record)
            if have < len(keys) and any(
                have < len(s.keys) and s.keys[have] == keys[have] and (s.params.record or not record)
                for s in leaders
            ):
                deferred.append(seq)
                continue
            reused = self.pool.match_prefix(keys[:have])
            # Blocks are taken as the output grows (see _grow): here the prefill and the first token.
            # Headroom of one block per running request keeps a new admission from forcing an
            # immediate preemption.
            need = self.blocks_needed(len(seq.fill), 1) - len(reused)
            if need > self.pool.available - (len(self._running) if self._running else 0):
                self.pool.release(reused)
                self.pool.prefix_hits -= len(reused)
                self._waiting.appendleft(seq)
                break
            seq.blocks = reused + self.pool.allocate(need)
            seq.cached = len(reused) * self.pool.block_size
            if not seq.generated:  # a resumed request reports its first admission's reuse
                seq.reused = seq.cached
            seq.admitted = next(self._admissions)
            if record:
                seq.route_chunks = [self.pool.routes_of(key) for key in keys[:have]]  # type: ignore[misc]
            self._running.append(seq)
            if self.share_prefill:
                leaders.append(seq)
        self._waiting.extendleft(reversed(deferred))  # they keep their place in the queue

    def _take_row(self, seq: _Seq) -> None:
        """Give ``seq`` a staging row (its cached positions copied in) when one is free and the
        sequence fits; otherwise it decodes from the pool."""
        assert self.staging is not None
        if not self.staging.fits(len(self._rows) + 1, seq.cached + 1):
            return
        seq.row = len(self._rows)
        self._rows.append(seq)
        if not self.staging.fixed:
            self.staging.reserve(len(self._rows), len(seq.prompt) + seq.params.max_tokens)
        self.staging.load(seq.row, self.pool, seq.blocks, seq.cached)

    def _unstage(self, seq: _Seq) -> None:
        """``seq`` outgrew its fixed-length row: its positions go to its pool blocks (which its
        output has held since it started) and it decodes from the pool from now on."""
        assert self.staging is not None and seq.row is not None
        self.staging.store(seq.row, self.pool, seq.blocks, seq.cached)
        self._free_row(seq)

    def _free_row(self, seq: _Seq) -> None:
        """Give up ``seq``'s staging row; the last row moves into it so rows stay packed."""
        if seq.row is None or self.staging is None:
            return
        last = self._rows.pop()
        if last is not seq:
            self.staging.move(last.row, seq.row, last.cached)  # type: ignore[arg-type]
            last.row = seq.row
            self._rows[seq.row] = last
        seq.row = None

    def _run(self, seqs: list[_Seq], inputs: list[list[int]], staged: bool = False) -> tuple[list[_Seq], torch.Tensor]:
        """One forward; when it raises, each row again alone, so only the request that causes the
        error ends with it (the others of the step go on). Returns the rows that went through and
        their last-position logits."""
        try:
            return seqs, self._forward(seqs, inputs, staged)
        except Exception as e:
            if len(seqs) == 1:
                failed = [(seqs[0], e)]
                kept: list[_Seq] = []
                rows: list[torch.Tensor] = []
            else:
                failed, kept, rows = [], [], []
                for seq, inp in zip(seqs, inputs, strict=True):
                    try:
                        rows.append(self._forward([seq], [inp], staged, alone=True))
                        kept.append(seq)
                    except Exception as e1:  # this one's own fault
                        failed.append((seq, e1))
        with self._cv:
            for seq, err in failed:
                self._finish(seq, "error", f"{type(err).__name__}: {err}")
        return kept, torch.cat(rows) if rows else torch.empty(0)

    def _forward(
        self, seqs: list[_Seq], inputs: list[list[int]], staged: bool = False, alone: bool = False
    ) -> torch.Tensor:
        S = len(inputs[0])
        lengths = [s.cached for s in seqs]
        if staged and alone:
            assert self.staging is not None and seqs[0].row is not None
            view: Any = self.staging.batch(lengths, S, rows=[seqs[0].row])
        elif staged:
            assert self.staging is not None and all(s.row == b for b, s in enumerate(seqs))
            view = self.staging.batch(lengths, S)
        else:
            view = PagedBatchView(self.pool, [s.blocks for s in seqs], lengths, S)
        ids = torch.tensor(inputs, dtype=torch.long, device=self.device)
        # Prompt logprobs need every position's logits (prefill only).
        keep = 0 if not staged and any(s.params.prompt_logprobs is not None and not s.prompt_lp_sent
                                       for s in seqs) else 1  # fmt: skip
        if any(s.params.record for s in seqs):
            out = self.model(ids, cache=view, logits_to_keep=keep, return_routes=True)
            routes = [None if r is None else r.cpu() for r in out.routes]  # per layer (B, S, k)
            for b, s in enumerate(seqs):
                if s.params.record:
                    s.route_chunks.append([None if r is None else r[b] for r in routes])
                    if len(s.route_chunks) >= _MERGE_ROUTES_EVERY:
                        self._merged_routes(s)
        else:
            out = self.model(ids, cache=view, logits_to_keep=keep)
        if keep == 0:
            self._keep_prompt_logprobs(seqs, inputs, out.logits)
        logits = out.logits[:, -1].float()  # (B, V)
        for s in seqs:
            s.cached += S
        return logits

    @staticmethod
    def _keep_prompt_logprobs(seqs: list[_Seq], inputs: list[list[int]], logits: torch.Tensor) -> None:
        """Per prompt-logprob row: the logprob of each next prompt token this chunk predicts."""
        for b, seq in enumerate(seqs):
            top = seq.params.prompt_logprobs
            if top is None or seq.prompt_lp_sent:
                continue
            start = seq.cached  # the chunk covers prompt[start : start + S]
            n = min(len(inputs[b]), len(seq.prompt) - 1 - start)  # positions whose next token is a prompt token
            if n <= 0:
                continue
            logp = torch.log_softmax(logits[b, :n].float(), dim=-1)  # (n, V)
            nxt = torch.tensor(seq.prompt[start + 1 : start + 1 + n], device=logp.device)
            seq.prompt_lps += logp.gather(1, nxt[:, None]).squeeze(1).tolist()
            if top:
                v, i = logp.topk(min(top, logp.shape[-1]), dim=-1)
                seq.prompt_top += [list(zip(ii, vv, strict=True)) for ii, vv in zip(i.tolist(), v.tolist(), strict=True)]
            else:
                seq.prompt_top += [[] for _ in range(n)]

    def step(self) -> None:
        """One engine iteration: one batched prefill chunk, then one decode step for all."""
        with self._cv:
            running = list(self._running)
        prefilled: set[int] = set()
        waiting = [s for s in running if s.cached < len(s.fill)]
        if waiting:
            # Rows of one forward need the same number of new tokens: batch the prompts whose next
            # chunk has the first one's length, within the prefill token budget.
            width = min(self.prefill_chunk, len(waiting[0].fill) - waiting[0].cached)
            group = [s for s in waiting if min(self.prefill_chunk, len(s.fill) - s.cached) == width]
            group = group[: max(1, self.prefill_budget // width)]
            group, logits = self._run(group, [s.fill[s.cached : s.cached + width] for s in group])
            bs = self.pool.block_size
            for seq in group:
                for i in range(seq.cached // bs):
                    self.pool.register(seq.blocks[i], seq.keys[i])
                if seq.params.record:
                    self._keep_block_routes(seq)
                prefilled.add(seq.id)
            done = [row for row, seq in enumerate(group) if seq.cached == len(seq.fill)]
            for row in done:
                seq = group[row]
                if seq.params.prompt_logprobs is not None and not seq.prompt_lp_sent:
                    seq.prompt_lp_sent = True
                    self._emit(seq, PromptLogprobs(seq.prompt_lps, seq.prompt_top))
            if done:
                self._sample([group[row] for row in done], logits[done])
        with self._cv:  # a forward's failure may have ended some
            alive = set(map(id, self._running))
        decode = [
            s for s in running
            if id(s) in alive and s.cached >= len(s.fill) and s.id not in prefilled and s.generated
        ]  # fmt: skip
        decode = self._grow(decode)
        groups = [(decode, False)]
        if decode and self.staging is not None:
            for seq in list(self._rows):
                if not self.staging.fits(1, seq.cached + 1):
                    self._unstage(seq)
            for seq in decode:
                if seq.row is None:
                    self._take_row(seq)
            # Every staged sequence decodes (one still prefilling has no row), in row order; the
            # ones the fixed rows cannot hold decode from the pool in a second forward. Both lists
            # are taken before either samples: a sequence that finishes gives up its row.
            groups = [(list(self._rows), True), ([s for s in decode if s.row is None], False)]
        for seqs, staged in groups:
            if seqs:
                seqs, logits = self._run(seqs, [[s.generated[-1]] for s in seqs], staged=staged)
                if seqs:
                    self._sample(seqs, logits)

    def _grow(self, decode: list[_Seq]) -> list[_Seq]:
        """Give every decoding request the block its next token needs; when the pool is out of
        blocks, preempt the newest running request (its blocks go back to the pool, and it waits
        at the head of the queue to be recomputed from its prompt and output so far). Returns the
        requests that still decode this step."""
        bs = self.pool.block_size
        for seq in sorted(decode, key=lambda s: s.admitted):
            while seq in self._running and len(seq.blocks) * bs < seq.cached + 1:
                if self.pool.available:
                    seq.blocks += self.pool.allocate(1)
                    continue
                with self._cv:
                    victim = max(self._running, key=lambda s: s.admitted)
                    self._preempt(victim)
        return [s for s in decode if s in self._running]

    def _preempt(self, seq: _Seq) -> None:
        """Stop ``seq`` and queue it first for recompute (with ``self._cv`` held)."""
        self._running.remove(seq)
        self._free_row(seq)
        self.pool.release(seq.blocks)
        seq.blocks, seq.cached = [], 0
        seq.fill = seq.prompt + seq.generated
        seq.keys = prefix_keys(seq.fill, self.pool.block_size)
        seq.route_chunks = []  # the recompute records the routes of every position again
        self._waiting.appendleft(seq)
        self.preemptions += 1

    def _keep_block_routes(self, seq: _Seq) -> None:
        """Hand the routes of ``seq``'s full prompt blocks to the prefix cache (those it lacks)."""
        bs = self.pool.block_size
        missing = [i for i in range(seq.cached // bs) if self.pool.routes_of(seq.keys[i]) is None]
        if missing:
            routes = self._merged_routes(seq)
            for i in missing:
                self.pool.set_routes(
                    seq.keys[i], [None if r is None else r[i * bs : (i + 1) * bs] for r in routes]
                )

    @staticmethod
    def _merged_routes(seq: _Seq) -> list[torch.Tensor | None]:
        """``seq``'s routes so far as one ``[positions, k]`` tensor per layer (kept as its one chunk)."""
        merged: list[torch.Tensor | None] = []
        for layer, first in enumerate(seq.route_chunks[0]):
            pieces = [c[layer] for c in seq.route_chunks]
            merged.append(None if first is None else torch.cat(pieces))  # type: ignore[arg-type]
        seq.route_chunks = [merged]
        return merged

    def _sample(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        from dsv.core.generate import SamplingParams, apply_logit_bias, apply_penalties, sample_next

        # Logit bias, penalties, prefix choices, grammars and vLLM's extensions on a copy: the
        # logprobs below stay the model's own.
        chosen_from = logits
        constrained: set[int] = set()  # rows where something masked tokens (-inf)
        grammar_rows: list[int] = []
        for row, seq in enumerate(seqs):
            p = seq.params
            if p.leaves_logits:
                continue
            allowed = self._allowed(seq) if p.prefix_choices and not seq.choice_done else None
            in_grammar = seq.matcher is not None and self._grammar_started(seq)
            early = p.min_tokens > len(seq.generated) and bool(p.stop_token_ids)
            if allowed is not None or in_grammar or early or (p.min_p > 0 and p.temperature > 0):
                constrained.add(row)
            if in_grammar:
                grammar_rows.append(row)
            adjust = bool(p.logit_bias or (p.penalised and seq.counts) or allowed is not None or early
                          or p.repetition_penalty != 1)  # fmt: skip
            if (adjust or row in constrained) and chosen_from is logits:
                chosen_from = logits.clone()
            if adjust:
                adjusted = apply_logit_bias(chosen_from[row], dict(p.logit_bias))
                adjusted = apply_penalties(adjusted, seq.counts, p.presence_penalty, p.frequency_penalty)
                if p.repetition_penalty != 1:
                    adjusted = _repetition_penalty(adjusted, seq, p.repetition_penalty)
                if allowed is not None:
                    keep = torch.tensor(sorted(allowed), device=adjusted.device)
                    adjusted = torch.full_like(adjusted, float("-inf")).index_copy_(0, keep, adjusted[keep])
                if early:  # no stop token before min_tokens
                    adjusted = adjusted.clone()
                    adjusted[list(p.stop_token_ids)] = float("-inf")
                chosen_from[row] = adjusted
        if grammar_rows:
            fill_masks([seqs[r].matcher for r in grammar_rows], chosen_from, grammar_rows)  # type: ignore[misc]
        for row, seq in enumerate(seqs):
            p = seq.params
            if not p.leaves_logits and p.min_p > 0 and p.temperature > 0:
                # p_i >= min_p * p_max  <=>  l_i >= l_max + T * ln(min_p), on the adjusted logits.
                r = chosen_from[row]
                floor = r.max() + p.temperature * math.log(p.min_p) if p.min_p < 1 else r.max()
                chosen_from[row] = r.masked_fill(r < floor, float("-inf"))
        # Greedy rows in one argmax; sampled rows one by one (each has its own settings and generator).
        # A row whose sampling fails ends with an error; the other rows go on.
        tokens = chosen_from.argmax(-1).tolist()
        failed: dict[int, str] = {}
        # Recording rows: the logprob under the sampling distribution and the kept set (a mask, or
        # None for every token), from sample_next itself.
        sample_logprob: dict[int, float] = {}
        kept_mask: dict[int, torch.Tensor | None] = {}
        for row, seq in enumerate(seqs):
            p = seq.params
            if p.temperature != 0:
                sp = SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, max_new_tokens=1)
                try:
                    res = sample_next(chosen_from[row : row + 1], sp, seq.generator)
                except Exception as e:  # reported to that request alone
                    failed[row] = f"sampling failed: {type(e).__name__}: {e}"
                    continue
                tokens[row] = int(res.tokens[0])
                if p.record:
                    sample_logprob[row] = float(res.logprobs[0])
                    if p.top_p == 1 and p.top_k == 0 and row not in constrained:
                        kept_mask[row] = None
                    elif row in constrained:  # top-k can keep masked tokens when few are left
                        kept_mask[row] = res.kept_mask[0] & chosen_from[row].isfinite()
                    else:
                        kept_mask[row] = res.kept_mask[0]
            elif p.record:
                sample_logprob[row], kept_mask[row] = 0.0, None
        kept: dict[int, torch.Tensor | None] = {}
        if kept_mask:
            # Ordinary tensors, not inference ones: an RL update uses them under autograd.
            with torch.inference_mode(False):
                for row, mask in kept_mask.items():
                    if seqs[row].params.temperature == 0:
                        kept[row] = torch.tensor([tokens[row]], dtype=torch.long)
                    else:
                        kept[row] = None if mask is None else mask.nonzero().squeeze(1).cpu()
        # One log-softmax serves the chosen tokens' logprobs and any alternatives asked for (on CPU it
        # costs about half of a separate logsumexp).
        logp = torch.log_softmax(logits, dim=-1)
        chosen = logp.gather(1, torch.tensor(tokens, device=logits.device)[:, None]).squeeze(1).tolist()
        with self._cv:
            self.generated_tokens += len(seqs)
            cancelled = set(self._cancel)
        ended: list[tuple[_Seq, str, str]] = []
        for row, seq in enumerate(seqs):
            if row in failed:
                ended.append((seq, "error", failed[row]))
                continue
            p, token = seq.params, tokens[row]
            seq.generated.append(token)
            if p.penalised:
                seq.counts[token] += 1
            if seq.seen is not None:
                seq.seen.add(token)
            if seq.id in cancelled:
                continue
            if row in grammar_rows and not seq.matcher.consume(token):  # type: ignore[union-attr]
                # Only when every token was masked (an empty grammar step): nothing valid can follow.
                ended.append((seq, "error", f"the output left its grammar: {seq.matcher.error}"))  # type: ignore[union-attr]
                continue
            top: list[tuple[int, float]] = []
            if p.top_logprobs:
                v, i = logp[row].topk(min(p.top_logprobs, logp.shape[-1]))
                top = list(zip(i.tolist(), v.tolist(), strict=True))
            self._emit(seq, TokenEvent(token, chosen[row], top, sample_logprob.get(row), kept.get(row)))
            if token in p.stop_token_ids:
                ended.append((seq, "stop", ""))
            elif len(seq.generated) >= p.max_tokens:
                ended.append((seq, "length", ""))
        if ended:
            with self._cv:
                for seq, reason, error in ended:
                    self._finish(seq, reason, error)

    @staticmethod
    def _grammar_started(seq: _Seq) -> bool:
        """Whether ``seq``'s grammar applies to its next token (it waits for ``grammar_after``)."""
        if seq.grammar_from is None:
            after = seq.params.grammar_after
            if after and tuple(seq.generated[-len(after) :]) != after:
                return False
            seq.grammar_from = len(seq.generated)
        return True

    @staticmethod
    def _allowed(seq: _Seq) -> set[int] | None:
        """The tokens ``seq``'s ``prefix_choices`` allow next, None when nothing is masked now."""
        p = seq.params
        if seq.choice_from is None:
            after = p.prefix_after
            if after and tuple(seq.generated[-len(after) :]) != after:
                return None  # the constraint has not started
            seq.choice_from = len(seq.generated)
        allowed = p.allowed_next(seq.generated[seq.choice_from :])
        seq.choice_done = allowed is None
        return allowed

    def _finish(self, seq: _Seq, reason: str, error: str = "") -> None:
        if seq in self._running:
            self._running.remove(seq)
            self._free_row(seq)
            self.pool.release(seq.blocks)
        seq.blocks = []
        routes = None
        if seq.params.record and seq.route_chunks:
            # Ordinary tensors, not inference ones: an RL update forces them under autograd.
            with torch.inference_mode(False):
                routes = self._merged_routes(seq)
        self._emit(seq, Finish(reason, len(seq.prompt), len(seq.generated), error, routes, seq.reused))
