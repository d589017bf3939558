"""Every family: deterministic, JSON round-trip, reference accepted, perturbations rejected,
random, trivial and constant answers pass rarely (< 5% over 100 seeds at the default difficulty).

The constant answer is the strongest answer-blind policy: the most common reference answer over the
seeds, what a policy that learned the answer distribution but not the task would give.

Run: pytest packages/synth/tests/test_synth_families.py
"""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from dsv.synth import DEFAULT_DIFFICULTY, Task, registry, safe_verify
from dsv.synth.tools import call_tool

FAMILIES = sorted(registry.families())
N_SEEDS = 100
TRIVIAL = ["", "0", "1", "yes", "none", 0, 1, -1, [], {}, None, True, "Answer", [""], {"": ""}]
# code_repair verifies in a sandboxed subprocess (~50 ms each); fewer seeds keep CI quick.
SEEDS = {"code_repair": 30}


def test_at_least_twelve_families_across_domains() -> None:
    assert len(FAMILIES) >= 12
    domains = {cls.domain for cls in registry.families().values()}
    assert {"maths", "logic", "planning", "code", "data", "search"} <= domains


@pytest.mark.parametrize(
    "family", [pytest.param(f, marks=pytest.mark.slow) if f == "code_repair" else f for f in FAMILIES]
)
def test_family_hard_to_guess_easy_to_verify(family: str) -> None:
    env = registry.get(family)
    n = SEEDS.get(family, N_SEEDS)
    rng = random.Random(0)
    tasks = [env.generate(seed, DEFAULT_DIFFICULTY) for seed in range(n)]
    answers = [env.solve(t) for t in tasks]
    n_perturbed = 0
    for task, answer in zip(tasks, answers, strict=True):
        assert task.id == f"{family}-{DEFAULT_DIFFICULTY}-{task.seed}"
        assert Task.from_json(json.loads(json.dumps(task.to_json()))) == task
        score = safe_verify(env, task, answer)
        assert score.passed and score.reward == 1.0, (task.id, score)
        for bad in env.perturb(task, answer, rng):
            n_perturbed += 1
            s = safe_verify(env, task, bad)
            assert not s.passed, (task.id, bad, s)
            assert s.reason
    assert n_perturbed >= n, "each task should have at least one systematic wrong variant"
    # Random answers: the reference answer of another seed (right shape, wrong world); trivial answers.
    random_passes = sum(
        safe_verify(env, tasks[i], answers[(i + 1 + rng.randrange(n - 1)) % n]).passed for i in range(n)
    )
    assert random_passes / n < 0.05, f"{family}: {random_passes}/{n} random answers pass"
    for trivial in TRIVIAL:
        passes = sum(safe_verify(env, t, trivial).passed for t in tasks)
        assert passes / n < 0.05, f"{family}: trivial answer {trivial!r} passes {passes}/{n}"


@pytest.mark.parametrize("family", FAMILIES)
def test_family_is_deterministic_and_difficulty_range(family: str) -> None:
    env = registry.get(family)
    for d in (1, env.max_difficulty):
        a, b = env.generate(7, d), env.generate(7, d)
        assert a == b
        assert safe_verify(env, a, env.solve(a)).passed, (family, d)
    assert env.generate(1).to_json() != env.generate(2).to_json()
    with pytest.raises(ValueError):
        env.generate(0, env.max_difficulty + 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_tool_schemas_match_bound_tools(family: str) -> None:
    env = registry.get(family)
    task = env.generate(3)
    fns = env.tools(task)
    assert [t["function"]["name"] for t in task.tools] == [f.__name__ for f in fns]
    for entry in task.tools:
        assert entry["type"] == "function"
        assert entry["function"]["description"]
        # A bad call is answered with a readable error, never an exception.
        assert call_tool(fns, entry["function"]["name"], "{not json").startswith("error:")


@pytest.mark.parametrize(
    "family", [pytest.param(f, marks=pytest.mark.slow) if f == "code_repair" else f for f in FAMILIES]
)
def test_the_most_common_answer_passes_rarely(family: str) -> None:
    env = registry.get(family)
    tasks = [env.generate(seed, DEFAULT_DIFFICULTY) for seed in range(N_SEEDS)]
    answers = Counter(json.dumps(env.solve(t), sort_keys=True) for t in tasks)
    common, share = answers.most_common(1)[0]
    passes = sum(safe_verify(env, t, json.loads(common)).passed for t in tasks)
    assert passes / N_SEEDS < 0.05, (
        f"{family}: the most common reference answer {common[:80]} ({share} of {N_SEEDS} seeds) passes "
        f"{passes}/{N_SEEDS}"
    )
