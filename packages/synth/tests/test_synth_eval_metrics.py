"""Eval metrics against slow, obviously correct twins: pass@k by enumerating subsets, percentiles by numpy.

Run: pytest packages/synth/tests/test_synth_eval_metrics.py
"""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from dsv.synth.eval.metrics import k_values, pass_at_k, percentile, summarize, summarize_groups


def _pass_at_k_by_enumeration(n: int, c: int, k: int) -> float:
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 7])
def test_pass_at_k_matches_enumeration(n: int) -> None:
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_by_enumeration(n, c, k), abs=1e-12), (
                n,
                c,
                k,
            )


def test_pass_at_k_is_stable_for_large_n() -> None:
    # C(200, 100) overflows floats; the product form does not
    value = pass_at_k(200, 3, 100)
    exact = 1 - math.comb(197, 100) / math.comb(200, 100)
    assert value == pytest.approx(exact, rel=1e-12)
    assert pass_at_k(200, 0, 50) == 0.0 and pass_at_k(200, 200, 1) == 1.0


def test_pass_at_k_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_percentile_matches_numpy() -> None:
    rng = random.Random(0)
    for size in (1, 2, 3, 10, 101):
        values = [rng.uniform(-5, 50) for _ in range(size)]
        for q in (0, 10, 50, 90, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert math.isnan(percentile([], 90))


def test_k_values() -> None:
    assert k_values(1) == [1]
    assert k_values(4) == [1, 2, 4]
    assert k_values(10) == [1, 2, 4, 8, 10]


def _rec(task: str, passed: bool, **kw: object) -> dict:
    base = {
        "task_id": task,
        "family": "f",
        "thinking": True,
        "passed": passed,
        "output_tokens": 10,
        "reasoning_tokens": 4,
        "reasoning_source": "usage",
        "tool_calls": 1,
        "status": "done",
        "reason": "",
    }
    return {**base, **kw}


def test_summarize_counts_and_pass_at_k() -> None:
    records = [
        _rec("a", True, output_tokens=10),
        _rec("a", False, output_tokens=20, reason="wrong value 3"),
        _rec("b", False, output_tokens=30, reason="wrong value 3"),
        _rec("b", False, output_tokens=40, tool_calls=3),
    ]
    m = summarize(records)
    assert m["episodes"] == 4 and m["tasks"] == 2 and m["samples_per_task"] == 2
    assert m["accuracy"] == 0.25
    assert m["pass@1"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["pass@2"] == pytest.approx((1.0 + 0.0) / 2)
    assert m["output_tokens_mean"] == 25 and m["output_tokens_p90"] == pytest.approx(
        np.percentile([10, 20, 30, 40], 90)
    )
    assert m["tool_calls_per_episode"] == 1.5
    assert m["failure_reasons"] == {"wrong value 3": 2, "failed": 1}
    assert m["reasoning_tokens_source"] == ["usage"]


def test_summarize_groups_splits_modes_and_families() -> None:
    records = [_rec("a", True), _rec("b", False, family="g"), _rec("a", False, thinking=False)]
    groups = summarize_groups(records)
    assert set(groups) == {"thinking", "no-thinking"}
    assert set(groups["thinking"]["families"]) == {"f", "g"}
    assert groups["no-thinking"]["overall"]["accuracy"] == 0.0
    assert groups["thinking"]["overall"]["accuracy"] == 0.5
