"""Fast paths of task generation agree with their slow, obvious twins.

Run: pytest packages/synth/tests/test_synth_fastpaths.py

- arithmetic's incrementally kept value and `int_expression_value` (an AST walker) against
  Python's own `eval`, on arithmetic tasks and on random expressions;
- `sample_two` against `random.Random.sample(seq, 2)`, draw for draw;
- cached tool schemas against `tool_schema` built fresh, for every family with tools.
"""

from __future__ import annotations

import random

import pytest

from dsv.synth import registry
from dsv.synth.env import _cached_schemas, _schema_probe
from dsv.synth.families.data import sample_two
from dsv.synth.families.maths import int_expression_value
from dsv.synth.tools import tool_schema


def test_incremental_value_and_ast_walker_match_eval_on_arithmetic_tasks() -> None:
    env = registry.get("arithmetic")
    for difficulty in range(1, 6):
        for seed in range(100):
            state = env.generate(seed, difficulty).state
            expr = state["expression"]
            want = eval(expr)  # the slow twin, on text this test's generator built
            assert int(state["answer"]) == want, expr
            assert int_expression_value(expr) == want, expr


def test_sample_two_draws_exactly_like_random_sample() -> None:
    for n in range(2, 41):
        seq = [f"s{i}" for i in range(n)]
        for seed in range(40):
            fast, slow = random.Random(f"{n}/{seed}"), random.Random(f"{n}/{seed}")
            for _ in range(5):
                assert sample_two(fast, seq) == tuple(slow.sample(seq, 2)), (n, seed)
            assert fast.random() == slow.random()  # the generators stay in step afterwards
    with pytest.raises(ValueError):
        sample_two(random.Random(0), ["only"])


def test_ast_walker_matches_eval_on_random_expressions() -> None:
    rng = random.Random(0)
    ops = ["+", "-", "*", "//", "%"]
    for _ in range(500):
        expr = str(rng.randint(-50, 50))
        for _ in range(rng.randint(1, 8)):
            b = rng.choice([rng.randint(1, 99), -rng.randint(1, 9)])
            term = f"({b})" if b < 0 else str(b)
            expr = (
                f"({expr} {rng.choice(ops)} {term})"
                if rng.random() < 0.5
                else f"{expr} {rng.choice(ops)} {term}"
            )
        assert int_expression_value(expr) == eval(expr), expr


@pytest.mark.parametrize(
    "bad", ["2 ** 3", "1 / 2", "x + 1", "__import__('os')", "1.5 + 1", "True + 1", "[1][0]"]
)
def test_ast_walker_refuses_anything_else(bad: str) -> None:
    with pytest.raises(ValueError):
        int_expression_value(bad)


def test_cached_tool_schemas_equal_fresh_ones_and_are_independent_copies() -> None:
    for name, cls in registry.families().items():
        env = cls()
        for seed in (0, 1):
            task = env.generate(seed)
            fresh = [
                tool_schema(fn) for fn in env.tools(_schema_probe(name, seed, task.difficulty, task.state))
            ]
            assert task.tools == fresh, name
    travel = registry.get("travel")
    a, b = travel.generate(0), travel.generate(1)
    a.tools[0]["function"]["name"] = "changed"
    assert (
        b.tools[0]["function"]["name"] != "changed"
        and travel.generate(2).tools[0]["function"]["name"] != "changed"
    )


def test_cache_tells_apart_functions_with_the_same_code() -> None:
    def make(default: int):
        def tool(x: int = default) -> str:
            """A tool.

            Args:
                x: a number.
            """
            return str(x)

        return tool

    first, second = _cached_schemas([make(3)]), _cached_schemas([make(4)])
    assert first[0]["function"]["parameters"]["properties"]["x"]["default"] == 3
    assert second[0]["function"]["parameters"]["properties"]["x"]["default"] == 4


def test_cache_handles_unhashable_defaults() -> None:
    def pick(items: list[int] = [1, 2]) -> str:  # noqa: B006 - the unhashable default is the point
        """Pick one.

        Args:
            items: candidates.
        """
        return str(items[0])

    first, second = _cached_schemas([pick]), _cached_schemas([pick])
    assert first == second == [tool_schema(pick)]
    assert first[0] is not second[0]
