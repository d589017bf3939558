"""The `lookup` family: one record answers, every other record's value fails, levels grow the context.

Run: ``pytest packages/synth/tests/test_synth_retrieval.py``.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest

from dsv.synth import registry


@pytest.mark.parametrize("level", [1, 2, 3, 4, 5])
def test_only_the_asked_record_passes(level: int) -> None:
    env = registry.get("lookup")
    for seed in range(20):
        task = env.generate(seed, level)
        records = dict(re.findall(r"^- (.+) = (\d+)$", task.prompt, flags=re.M))
        assert len(records) == {1: 4, 2: 8, 3: 32, 4: 128, 5: 512}[level]
        key = re.search(r"What is the value of (.+)\?$", task.prompt).group(1)  # type: ignore[union-attr]
        assert int(records[key]) == env.solve(task)
        assert env.verify(task, env.parse_answer(f"Answer: {records[key]}")).passed
        # A value copied from any other record is wrong: the family needs the key, not a guess.
        assert not any(env.verify(task, int(v)).passed for k, v in records.items() if k != key)
        thought = env.reasoning(task)
        assert thought is not None and f"{key} = {records[key]}" in thought


def test_a_constant_answer_rarely_passes() -> None:
    env = registry.get("lookup")
    for level in (2, 3, 4, 5):  # level 1's 90 two-digit values leave a constant answer near 5%
        answers = Counter(env.solve(env.generate(seed, level)) for seed in range(200))
        assert answers.most_common(1)[0][1] / 200 < 0.05
    level_1 = Counter(env.solve(env.generate(seed, 1)) for seed in range(200))
    assert level_1.most_common(1)[0][1] / 200 < 0.08


def test_bad_answers_fail_with_a_reason() -> None:
    env = registry.get("lookup")
    task = env.generate(0, 1)
    for text in ("Answer: forty", "Answer: 1.5", "no number here"):
        score = env.verify(task, env.parse_answer(text))
        assert not score.passed and score.reason
