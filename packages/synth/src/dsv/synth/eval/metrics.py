"""Eval metrics over per-episode result records: accuracy, unbiased pass@k, token statistics.

pass@k uses the unbiased estimator of Chen et al. (2021): with ``n`` samples of a task
of which ``c`` passed, ``pass@k = 1 - C(n-c, k) / C(n, k)``, computed as a running
product so it stays exact in floating point for large ``n``; the task-set value is the
mean over tasks. Percentiles use linear interpolation between order statistics (the
same rule as ``numpy.percentile``'s default), written out so this module needs no
numpy.

Records are the dicts ``dsv.synth.eval.runner`` appends to ``results.jsonl``; the
fields used here are ``task_id``, ``family``, ``thinking``, ``passed``,
``output_tokens``, ``reasoning_tokens``, ``reasoning_source``, ``tool_calls``,
``status`` and ``reason``.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["k_values", "pass_at_k", "percentile", "summarize", "summarize_groups"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one task with ``n`` samples, ``c`` of them correct (``k <= n``)."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    prob_all_fail = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_fail *= 1.0 - k / i
    return 1.0 - prob_all_fail


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation; NaN for an empty sequence."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def k_values(n: int) -> list[int]:
    """The k reported for ``n`` samples per task: powers of two below ``n``, and ``n`` itself."""
    ks = {n}
    k = 1
    while k < n:
        ks.add(k)
        k *= 2
    return sorted(ks)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate metrics of a set of episode records (one thinking mode, any families)."""
    records = list(records)
    by_task: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        by_task[r["task_id"]].append(bool(r["passed"]))
    out_tokens = [float(r.get("output_tokens", 0)) for r in records]
    reasoning = [float(r.get("reasoning_tokens", 0)) for r in records]
    tool_calls = [float(r.get("tool_calls", 0)) for r in records]
    # pass@k is only defined for k up to the smallest sample count among tasks
    n_min = min((len(v) for v in by_task.values()), default=0)
    pass_k: dict[str, float] = {}
    if n_min:
        for k in k_values(n_min):
            pass_k[f"pass@{k}"] = _mean([pass_at_k(len(v), sum(v), k) for v in by_task.values()])
    failures = Counter(str(r.get("reason") or "failed") for r in records if not r["passed"])
    return {
        "episodes": len(records),
        "tasks": len(by_task),
        "samples_per_task": n_min,
        "accuracy": _mean([1.0 if r["passed"] else 0.0 for r in records]),
        **pass_k,
        "output_tokens_mean": _mean(out_tokens),
        "output_tokens_p90": percentile(out_tokens, 90),
        "reasoning_tokens_mean": _mean(reasoning),
        "reasoning_tokens_p90": percentile(reasoning, 90),
        "reasoning_tokens_source": sorted({str(r.get("reasoning_source", "none")) for r in records}),
        "tool_calls_per_episode": _mean(tool_calls),
        "errors": sum(1 for r in records if r.get("status") == "error"),
        "failure_reasons": dict(failures.most_common()),
    }


def summarize_groups(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Metrics per thinking mode (``"thinking"``/``"no-thinking"``), overall and per family."""
    by_mode: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_mode["thinking" if r.get("thinking") else "no-thinking"].append(r)
    out: dict[str, Any] = {}
    for mode, rows in sorted(by_mode.items()):
        families: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            families[str(r.get("family") or "?")].append(r)
        out[mode] = {
            "overall": summarize(rows),
            "families": {name: summarize(fam_rows) for name, fam_rows in sorted(families.items())},
        }
    return out
