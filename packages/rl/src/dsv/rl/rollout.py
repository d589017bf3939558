"""Rollouts on the dsv serve Engine, in process: single-turn answers and multi-turn tool episodes.

Every sample is an episode of :func:`dsv.synth.episode.run_episode` (tool calls executed against the
task's environment, results fed back, the final answer parsed and verified); a task without tools
simply ends after its first turn. The policy of each episode renders the conversation with
:func:`dsv.core.chat.encode_messages` (which applies the thinking-with-tools context rule: the
reasoning of every step of the current turn stays in context) and works in token space: the prompt
of step ``k + 1`` is the exact token sequence of step ``k`` (its prompt and the sampled tokens) plus
the tokenised text ``encode_messages`` adds for the tool results. So the sequence the trainer sees is
the one the engine sampled, token for token; the sampled tokens of every assistant step are trained
and the tool-result and prompt tokens are masked out.

All episodes of a step advance in lock step: each turn, the pending requests of every episode still
running go to the engine as ONE ``Engine.generate_many`` call in episode order. The G samples of a
prompt share its prefill (the engine admits identical prompts together and prefills them once), and
the batches, hence the samples, do not depend on thread timing: a resumed run draws the same
rollouts as an uninterrupted one.

Per sampled token the engine records its log-probability under the sampling distribution (π_old)
and the kept set of top-k/top-p (Keep Sampling Mask); per request the MoE routes of every position
a training forward sees (Keep Routing).
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dsv.synth.env import Environment, Score, Task
from dsv.synth.episode import EpisodeResult, run_episode

__all__ = ["Rollout", "RolloutSettings", "rollout"]


@dataclass(frozen=True, kw_only=True)
class RolloutSettings:
    """Sampling settings of the rollouts (per assistant step)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 64  # per assistant step
    max_turns: int = 4  # assistant steps per episode (tool tasks)
    max_len: int = 1024  # whole episode, prompt included
    thinking: bool = False


@dataclass
class Rollout:
    """One sampled episode, ready for the update."""

    task: Task
    group: int  # which prompt of the step (its G samples share it)
    tokens: list[int]  # prompt + every step's sampled tokens + the tool results between them
    prompt_len: int
    trained: list[bool]  # per position of ``tokens``: sampled by the policy (an assistant token)
    sample_logprobs: list[float]  # per position: log π_old under the sampling distribution (0 if not trained)
    logprobs: list[float]  # per position: the engine's own log-softmax (0 if not trained)
    kept: list[torch.Tensor | None]  # per position: kept token ids at sampling (None: all; not trained: None)
    routes: list[torch.Tensor | None] | None  # per layer: [len(tokens) - 1, k] or None (dense layer)
    result: EpisodeResult
    finish_reason: str
    steps: int  # assistant steps
    completion_text: str  # the decoded assistant steps (tool results excluded)
    errors: list[str] = field(default_factory=list)

    @property
    def score(self) -> Score:
        return self.result.score

    @property
    def completion_tokens(self) -> int:
        return sum(self.trained)


class _LockStep:
    """Collects one request per running episode and sends them to the engine as one batch."""

    def __init__(self, n: int, run: Callable[[list[list[int]], list[Any]], list[Any]]) -> None:
        self._run = run
        self._cv = threading.Condition()
        self._active = n
        self._pending: dict[int, tuple[list[int], Any]] = {}
        self._results: dict[int, Any] = {}

    def request(self, episode: int, prompt: list[int], params: Any) -> Any:
        with self._cv:
            self._pending[episode] = (prompt, params)
            self._maybe_run()
            while episode not in self._results:
                self._cv.wait()
            out = self._results.pop(episode)
        if isinstance(out, BaseException):
            raise out
        return out

    def done(self) -> None:
        with self._cv:
            self._active -= 1
            self._maybe_run()

    def _maybe_run(self) -> None:
        if not self._pending or len(self._pending) < self._active:
            return
        order = sorted(self._pending)
        batch = [self._pending[i] for i in order]
        self._pending.clear()
        try:
            outs: list[Any] = self._run([p for p, _ in batch], [q for _, q in batch])
        except Exception as exc:  # every episode of the batch fails with it; the run goes on
            outs = [RuntimeError(f"engine: {type(exc).__name__}: {exc}")] * len(order)
        self._results.update(zip(order, outs, strict=True))
        self._cv.notify_all()


class _EpisodeState:
    """Token-space bookkeeping of one episode (what its policy sent and got)."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.prompt_len = 0
        self.trained: list[bool] = []
        self.sample_logprobs: list[float] = []
        self.logprobs: list[float] = []
        self.kept: list[torch.Tensor | None] = []
        self.routes: list[torch.Tensor | None] | None = None
        self.rendered = ""  # the text encode_messages gave for the conversation so far
        self.finish_reason = "stop"
        self.steps = 0
        self.texts: list[str] = []
        self.errors: list[str] = []


def _append(state: _EpisodeState, ids: list[int], *, trained: bool) -> None:
    state.tokens += ids
    state.trained += [trained] * len(ids)
    if not trained:
        state.sample_logprobs += [0.0] * len(ids)
        state.logprobs += [0.0] * len(ids)
        state.kept += [None] * len(ids)


def rollout(
    engine: Any,
    tokenizer: Any,
    tasks: Sequence[Task],
    envs: Sequence[Environment],
    *,
    group_size: int,
    settings: RolloutSettings,
    seed: int,
    step: int,
) -> list[Rollout]:
    """Sample ``group_size`` episodes of each task on ``engine`` (one ``generate_many`` per turn).

    Returns the rollouts in (task, sample) order. Sampling is seeded by (seed, step, episode, turn).
    """
    from dsv.core.chat import encode_messages, parse_assistant
    from dsv.serve.engine import GenParams

    n = len(tasks) * group_size
    states = [_EpisodeState() for _ in range(n)]
    eos = tokenizer.eos_id

    def run_batch(prompts: list[list[int]], params: list[Any]) -> list[Any]:
        return engine.generate_many(prompts, params)

    lockstep = _LockStep(n, run_batch)

    def policy_for(i: int) -> Callable[[list[dict], list[dict]], dict]:
        state = states[i]

        def policy(messages: list[dict], tools: list[dict]) -> dict:
            text = encode_messages(messages, thinking=settings.thinking, tools=tools or None)
            if not state.tokens:
                _append(state, tokenizer.encode(text, add_bos=False), trained=False)
                state.prompt_len = len(state.tokens)
            else:
                # The conversation so far renders as a prefix of the new one (results follow the
                # assistant's EOS); the new text is the tool results and the next generation prompt.
                assert text.startswith(state.rendered), "the chat encoding is not prefix-stable across tool results"
                _append(state, tokenizer.encode(text[len(state.rendered) :], add_bos=False), trained=False)
            room = settings.max_len - len(state.tokens)
            if room < 1:
                raise RuntimeError(f"the episode filled --max-len ({settings.max_len} tokens)")
            params = GenParams(
                temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                max_tokens=min(settings.max_tokens, room), stop_token_ids=(eos,), record=True,
                seed=(seed * 1_000_003 + step * 10_007 + i * 101 + state.steps) & 0x7FFFFFFF,
            )  # fmt: skip
            done = lockstep.request(i, list(state.tokens), params)
            if done.error:
                raise RuntimeError(f"engine: {done.error}")
            new = [int(t) for t in done.tokens]
            state.tokens += new
            state.trained += [True] * len(new)
            state.sample_logprobs += [float(x) for x in done.sample_logprobs]
            state.logprobs += [float(x) for x in done.logprobs]
            state.kept += list(done.kept) if done.kept is not None else [None] * len(new)
            # The last step's routes cover every earlier position too (its prompt is the whole history).
            state.routes = done.routes
            state.finish_reason = done.finish_reason
            state.steps += 1
            generated = tokenizer.decode(new, skip_special_tokens=False)
            state.texts.append(generated)
            parsed = parse_assistant(generated, thinking=settings.thinking)
            message = parsed.to_message()
            if done.finish_reason != "stop":
                message.pop("tool_calls", None)  # a cut-off step ends the episode; its calls may be partial
            state.rendered = encode_messages([*messages, message], thinking=settings.thinking, tools=tools or None)
            return message

        return policy

    def run(i: int) -> EpisodeResult:
        task = tasks[i // group_size]
        env = envs[i // group_size]
        try:
            return run_episode(env, task, policy_for(i), max_turns=settings.max_turns if task.tools else 1)
        finally:
            lockstep.done()

    with concurrent.futures.ThreadPoolExecutor(max_workers=n, thread_name_prefix="dsv-episode") as pool:
        results = list(pool.map(run, range(n)))

    out: list[Rollout] = []
    for i, (state, result) in enumerate(zip(states, results, strict=True)):
        if not state.steps:
            state.errors.append(result.score.reason)
        out.append(
            Rollout(
                task=tasks[i // group_size], group=i // group_size, tokens=state.tokens,
                prompt_len=state.prompt_len, trained=state.trained, sample_logprobs=state.sample_logprobs,
                logprobs=state.logprobs, kept=state.kept, routes=state.routes, result=result,
                finish_reason=state.finish_reason, steps=state.steps, completion_text="".join(state.texts),
                errors=state.errors,
            )
        )  # fmt: skip
    return out
