"""Rewards: the task's verifier, format and length terms, and user callables, weighted together.

Every reward function takes one :class:`RewardInput` (the prompt text, the completion text, the
parsed assistant message, the task's metadata and the episode's verifier score when there is one)
and returns a float. A user reward is a plain Python function, sync or async, in a file named on
the command line as ``path.py:fn``; it is called with keyword arguments it declares among
``prompt``, ``completion``, ``message``, ``task``, ``metadata`` and ``score`` (or ``**kwargs`` for
all of them)::

    # my_reward.py
    def brevity(completion: str, **_) -> float:
        return 1.0 if len(completion) < 200 else 0.0

    dsv rl grpo --reward my_reward.py:brevity=0.2 ...

A reward that raises, runs past its timeout or returns something that is not a finite number
scores 0 for that sample, and the reason goes into the run's log (``RewardResult.errors``); a run
never stops because of one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsv.core.errors import DSVError

__all__ = [
    "BUILTIN_REWARDS",
    "RewardError",
    "RewardInput",
    "RewardResult",
    "RewardSet",
    "WeightedReward",
    "format_reward",
    "length_reward",
    "load_reward",
    "parse_reward_spec",
    "verifier_reward",
]


class RewardError(DSVError):
    """A ``--reward`` spec cannot be used (no such file, does not import, no such function...)."""


@dataclass
class RewardInput:
    """What a reward function sees for one sample."""

    prompt: str
    completion: str  # the decoded completion (every assistant step of an episode, tool results excluded)
    message: dict[str, Any]  # the final parsed assistant message (content, reasoning_content, tool_calls)
    task: dict[str, Any]  # the task record (``Task.to_json()``: id, family, prompt, state, ...)
    score: Any = None  # the verifier's ``Score`` of the episode (None if the task has no verifier)
    finish_reason: str = "stop"  # "stop" | "length" | "error" of the last step
    completion_tokens: int = 0
    max_tokens: int = 0

    @property
    def metadata(self) -> dict[str, Any]:
        """Family, difficulty, seed and id of the task (the hidden state is in ``task``)."""
        return {k: self.task.get(k) for k in ("id", "family", "difficulty", "seed")}


RewardFn = Callable[..., Any]


def verifier_reward(inp: RewardInput) -> float:
    """The environment's verifier: its reward in [0, 1] (1 for a verified answer)."""
    return float(inp.score.reward) if inp.score is not None else 0.0


def format_reward(inp: RewardInput) -> float:
    """1 when the turn ended cleanly (EOS, not cut off) and its answer parsed, else 0."""
    if inp.finish_reason != "stop":
        return 0.0
    reason = str(getattr(inp.score, "reason", ""))
    return 0.0 if reason.startswith(("unparseable answer", "no final answer", "policy raised")) else 1.0


def length_reward(inp: RewardInput) -> float:
    """A length penalty in [-1, 0]: 0 up to half the token budget, then linear to -1 at the budget
    (DAPO's overlong shaping); a cut-off completion gets -1."""
    if inp.max_tokens <= 0:
        return 0.0
    if inp.finish_reason == "length":
        return -1.0
    soft = inp.max_tokens / 2
    return -max(0.0, (inp.completion_tokens - soft) / soft)


BUILTIN_REWARDS: dict[str, RewardFn] = {
    "verifier": verifier_reward,
    "format": format_reward,
    "length": length_reward,
}

_ARG_NAMES = ("prompt", "completion", "message", "task", "metadata", "score")


@dataclass
class WeightedReward:
    """One reward term: a name (for the metrics), its function and its weight."""

    name: str
    fn: RewardFn
    weight: float = 1.0
    builtin: bool = False

    def call(self, inp: RewardInput) -> Any:
        if self.builtin:
            return self.fn(inp)
        params = inspect.signature(self.fn).parameters
        every = {n: getattr(inp, n) for n in _ARG_NAMES}
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return self.fn(**every)
        return self.fn(**{n: v for n, v in every.items() if n in params})


def parse_reward_spec(spec: str) -> tuple[str, float]:
    """``NAME_OR_PATH[=WEIGHT]`` -> (target, weight); the weight defaults to 1."""
    target, sep, weight = spec.rpartition("=")
    if not sep:
        return spec, 1.0
    try:
        return target, float(weight)
    except ValueError:
        raise RewardError(f"--reward {spec!r}: the weight after '=' must be a number, got {weight!r}") from None


def load_reward(spec: str) -> WeightedReward:
    """A reward term from ``verifier``, ``format``, ``length`` or ``path.py:fn``, each with an
    optional ``=WEIGHT``."""
    target, weight = parse_reward_spec(spec)
    if target in BUILTIN_REWARDS:
        return WeightedReward(target, BUILTIN_REWARDS[target], weight, builtin=True)
    path_text, sep, fn_name = target.rpartition(":")
    if not sep or not path_text or not fn_name:
        raise RewardError(
            f"--reward {spec!r}: expected one of {', '.join(BUILTIN_REWARDS)} or PATH.py:FUNCTION[=WEIGHT]"
        )
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise RewardError(f"--reward {spec!r}: no file {path}")
    module_name = f"dsv_rl_reward_{abs(hash(str(path.resolve())))}"
    try:
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        assert loader_spec is not None and loader_spec.loader is not None, f"cannot load {path}"
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module
        loader_spec.loader.exec_module(module)
    except Exception as exc:  # any error in the user's file is a refused --reward, not a traceback
        sys.modules.pop(module_name, None)
        raise RewardError(
            f"--reward {spec!r}: {path} does not import: {type(exc).__name__}: {exc}"
        ) from None
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise RewardError(
            f"--reward {spec!r}: {path} has no function {fn_name!r} (it defines: {', '.join(names) or 'none'})"
        )
    return WeightedReward(f"{path.stem}:{fn_name}", fn, weight)


@dataclass
class RewardResult:
    """The weighted total of one sample, each term's raw value and the reasons of failed terms."""

    total: float
    terms: dict[str, float]
    errors: list[str] = field(default_factory=list)


class RewardSet:
    """Several weighted reward terms, each called safely (timeout, exceptions, NaN)."""

    def __init__(self, terms: Sequence[WeightedReward], *, timeout: float = 10.0) -> None:
        if not terms:
            raise RewardError("at least one --reward is needed")
        names = [t.name for t in terms]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise RewardError(f"--reward {dup!r} is given twice; give each term once with its weight")
        self.terms = list(terms)
        self.timeout = timeout
        # One worker per term: a hung user function blocks its worker, not the run (the thread is
        # abandoned; Python cannot kill it).
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    @classmethod
    def from_specs(cls, specs: Sequence[str], *, timeout: float = 10.0) -> RewardSet:
        return cls([load_reward(s) for s in specs], timeout=timeout)

    def _run_one(self, term: WeightedReward, inp: RewardInput) -> tuple[float, str | None]:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="dsv-reward")

        def call() -> Any:
            value = term.call(inp)
            if inspect.isawaitable(value):
                return asyncio.run(_awaited(value))
            return value

        future = self._pool.submit(call)
        try:
            value = future.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:
            # The stuck worker is left behind; a fresh pool keeps the next calls from queueing on it.
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
            return 0.0, f"{term.name}: timed out after {self.timeout:g}s"
        except Exception as exc:
            return 0.0, f"{term.name}: raised {type(exc).__name__}: {exc}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            return 0.0, f"{term.name}: returned {type(value).__name__}, not a number"
        if not math.isfinite(value):
            return 0.0, f"{term.name}: returned {value}"
        return float(value), None

    def score(self, inp: RewardInput) -> RewardResult:
        """The weighted sum over the terms for one sample."""
        terms: dict[str, float] = {}
        errors: list[str] = []
        for term in self.terms:
            value, why = self._run_one(term, inp)
            terms[term.name] = value
            if why is not None:
                errors.append(f"{inp.task.get('id', '?')}: {why}")
        total = sum(t.weight * terms[t.name] for t in self.terms)
        return RewardResult(total, terms, errors)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


async def _awaited(value: Any) -> Any:
    return await value
