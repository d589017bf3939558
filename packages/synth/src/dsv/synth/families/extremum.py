"""Extremum: the largest (or smallest) number of a list.

A comparison over every number of the prompt, answered by copying one of them: the answer is in the
context but which one depends on all the others, so a constant answer or a number copied at random
mostly fails. Levels grow the list, the range (negatives from level 3) and mix in "smallest".
"""

from __future__ import annotations

import random
from typing import Any

from dsv.synth.env import DEFAULT_DIFFICULTY, Environment, Score, Task, ToolCallRecord, integer_answer
from dsv.synth.registry import register

__all__ = ["ExtremumEnv"]

# (how many numbers, lowest, highest) per level.
_LEVELS = {1: (4, 10, 99), 2: (6, 10, 999), 3: (10, -999, 999), 4: (20, -9999, 9999), 5: (50, -99999, 99999)}


@register
class ExtremumEnv(Environment):
    name = "extremum"
    domain = "maths"
    description = "Name the largest (or smallest) number of a list: a comparison over every number, one copied."
    difficulty_knobs = "numbers = 4, 6, 10, 20, 50; range 10..99 up to -99999..99999; 'smallest' from level 2"

    def generate(self, seed: int, difficulty: int = DEFAULT_DIFFICULTY) -> Task:
        d = self._check_difficulty(difficulty)
        rng = self._rng(seed, d)
        n, lo, hi = _LEVELS[d]
        numbers = rng.sample(range(lo, hi + 1), n)
        # Level 1 asks only for the largest: the toy recipe's first skill; "smallest" from level 2.
        which = "largest" if d == 1 or rng.random() < 0.5 else "smallest"
        answer = max(numbers) if which == "largest" else min(numbers)
        prompt = f"Numbers: {', '.join(map(str, numbers))}\n\nWhich number is the {which}?"
        state = {"numbers": numbers, "which": which, "answer": answer}
        return self._task(seed, d, prompt, state, "Finish with one line `Answer: <number>`.", tools=[])

    def solve(self, task: Task) -> Any:
        return int(task.state["answer"])

    def reasoning(self, task: Task) -> str:
        # The comparison written out as a running best, left to right.
        numbers, largest = task.state["numbers"], task.state["which"] == "largest"
        best, steps = numbers[0], []
        for x in numbers[1:]:
            if (x > best) if largest else (x < best):
                best = x
            steps.append(str(best))
        return f"The {task.state['which']} so far: {', '.join([str(numbers[0]), *steps])}."

    def verify(self, task: Task, answer: Any, trace: list[ToolCallRecord] | None = None) -> Score:
        value = integer_answer(answer)
        if value is None:
            return Score.fail(f"answer is not an integer: {str(answer).strip()[:40]!r}")
        if value == int(task.state["answer"]):
            return Score.ok()
        if value in task.state["numbers"]:
            return Score.fail(f"{value} is in the list but not the {task.state['which']}")
        return Score.fail(f"{value} is not in the list")

    def perturb(self, task: Task, answer: Any, rng: random.Random) -> list[Any]:
        # The other numbers of the list are the likeliest wrong answers; off-by-one ones test the parser.
        others = [x for x in task.state["numbers"] if x != int(answer)]
        return [*rng.sample(others, min(3, len(others))), int(answer) + 1, int(answer) - 1]
