"""Retrieval: find the value stored under one key among many records.

The family DSA is about: the answer is written once in the context and the question names where.
A model must attend to the one record whose key matches the question's and copy its value; a
constant answer, or a value copied from a random record, mostly fails. Difficulty grows the number
of records (4 at level 1 up to 512 at level 5, a context several thousand tokens long), so the
same family measures short-context skill and long-context recall through sparse attention.
"""

from __future__ import annotations

import random
from typing import Any

from dsv.synth.env import DEFAULT_DIFFICULTY, Environment, Score, Task, ToolCallRecord, integer_answer
from dsv.synth.registry import register

__all__ = ["LookupEnv"]

# Short everyday words: a small tokenizer gives each one token, so a key reads the same in its
# record and in the question.
_NOUNS = [
    "river", "garden", "engine", "window", "planet", "bridge", "forest", "letter", "harbor", "village",
    "compass", "lantern", "market", "signal", "teacher", "kernel", "library", "token", "model", "circuit",
    "apple", "candle", "castle", "mirror",
]  # fmt: skip
_ADJECTIVES = [
    "quiet", "bright", "small", "distant", "careful", "old", "quick", "green", "heavy", "simple", "amber",
    "brave", "calm", "golden", "misty", "noble", "rapid", "silent", "swift", "warm", "icy", "proud",
]  # fmt: skip
# Records per level: short enough at 1-2 for a toy model, long-context retrieval at 4-5. Values
# widen with the level: two digits at level 1 (one token each for a small tokenizer), three from
# level 2, where a constant answer passes under 5% (90 two-digit values leave it near 5%).
_RECORDS = {1: 4, 2: 8, 3: 32, 4: 128, 5: 512}
_VALUES = {1: (10, 99), 2: (100, 999), 3: (100, 999), 4: (1000, 9999), 5: (1000, 9999)}


def _keys(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct keys: single nouns while they suffice, then "adjective noun" pairs."""
    if n <= len(_NOUNS) // 2:
        return rng.sample(_NOUNS, n)
    pairs = rng.sample(range(len(_ADJECTIVES) * len(_NOUNS)), n)
    return [f"{_ADJECTIVES[i // len(_NOUNS)]} {_NOUNS[i % len(_NOUNS)]}" for i in pairs]


@register
class LookupEnv(Environment):
    name = "lookup"
    domain = "retrieval"
    description = "Find the number stored under one key among many `key = value` records (recall from context)."
    difficulty_knobs = "records = 4, 8, 32, 128, 512 for levels 1..5; values 10..99 at level 1, 100..999 at 2-3, 1000..9999 at 4-5"

    def generate(self, seed: int, difficulty: int = DEFAULT_DIFFICULTY) -> Task:
        d = self._check_difficulty(difficulty)
        rng = self._rng(seed, d)
        n = _RECORDS[d]
        keys = _keys(rng, n)
        # Distinct values, so the value of a wrong record is never also right.
        lo, hi = _VALUES[d]
        values = rng.sample(range(lo, hi + 1), n)
        at = rng.randrange(n)
        records = "\n".join(f"- {k} = {v}" for k, v in zip(keys, values, strict=True))
        prompt = f"Records:\n{records}\n\nWhat is the value of {keys[at]}?"
        state = {"key": keys[at], "answer": values[at], "position": at, "records": n}
        return self._task(seed, d, prompt, state, "Finish with one line `Answer: <number>`.", tools=[])

    def solve(self, task: Task) -> Any:
        return int(task.state["answer"])

    def reasoning(self, task: Task) -> str:
        # The one step the answer needs: the matching record, quoted.
        key = task.state["key"]
        return f"Looking for {key}: {key} = {task.state['answer']}."

    def verify(self, task: Task, answer: Any, trace: list[ToolCallRecord] | None = None) -> Score:
        value = integer_answer(answer)
        if value is None:
            return Score.fail(f"answer is not an integer: {str(answer).strip()[:40]!r}")
        if value == int(task.state["answer"]):
            return Score.ok()
        return Score.fail(f"wrong value {value} for {task.state['key']!r}")

    def perturb(self, task: Task, answer: Any, rng: random.Random) -> list[Any]:
        # Another record's value is the likeliest wrong answer; off-by-one ones test the parser.
        wrong = [int(line.rsplit("=", 1)[1]) for line in task.prompt.splitlines() if line.startswith("- ")]
        x = int(answer)
        return [v for v in {*rng.sample(wrong, min(3, len(wrong))), x + 1, x - 1} if v != x]
