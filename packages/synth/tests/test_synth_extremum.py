"""The `extremum` family: only the asked extremum passes, every other number of the list fails.

Run: ``pytest packages/synth/tests/test_synth_extremum.py``.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest

from dsv.synth import registry


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
def test_only_the_extremum_passes(level: int) -> None:
    env = registry.get("extremum")
    whiches = set()
    for seed in range(30):
        task = env.generate(seed, level)
        numbers = [int(x) for x in re.search(r"Numbers: (.+)\n", task.prompt).group(1).split(", ")]  # type: ignore[union-attr]
        assert len(numbers) == len(set(numbers)) == {1: 4, 2: 6, 3: 10, 4: 20, 5: 50}[level]
        which = re.search(r"Which number is the (largest|smallest)\?$", task.prompt).group(1)  # type: ignore[union-attr]
        whiches.add(which)
        want = max(numbers) if which == "largest" else min(numbers)
        assert env.solve(task) == want and env.verify(task, env.parse_answer(f"Answer: {want}")).passed
        assert not any(env.verify(task, x).passed for x in numbers if x != want)
        # The worked reasoning ends on the answer: a running best over the list.
        thought = env.reasoning(task)
        assert thought.rstrip(".").split(", ")[-1].split()[-1] == str(want)
    assert whiches == ({"largest"} if level == 1 else {"largest", "smallest"})


def test_a_constant_answer_rarely_passes() -> None:
    env = registry.get("extremum")
    for level in (1, 2, 3, 5):
        answers = Counter(env.solve(env.generate(seed, level)) for seed in range(200))
        assert answers.most_common(1)[0][1] / 200 < 0.06


def test_wrong_answers_say_why() -> None:
    env = registry.get("extremum")
    task = env.generate(0, 1)
    other = next(x for x in task.state["numbers"] if x != env.solve(task))
    assert "not the largest" in env.verify(task, other).reason
    assert "not in the list" in env.verify(task, 1000).reason
    assert not env.verify(task, env.parse_answer("Answer: many")).passed
