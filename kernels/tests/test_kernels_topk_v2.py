"""The Triton top-k select (histogram, candidate buffer, radix refinement, sort) against core's
reference rule: exact index-for-index output (ascending positions, ``-1`` in place of ``-inf`` picks),
per-row key ranges ``[start, end)``, rows whose range holds fewer keys than ``k``, all ``-inf`` rows,
heavy exact ties, and a candidate buffer that overflows (the refinement then streams the row).

Run: ``pytest kernels/tests/test_kernels_topk_v2.py`` (interpreter, CPU).
"""

from __future__ import annotations

import pytest
import torch

import dsv.kernels as K
from dsv.core.attention import select_topk_reference
from dsv.kernels.ops.topk import triton as tk

NEG_INF = float("-inf")


def rule(scores: torch.Tensor, k: int, starts: torch.Tensor | None = None, ends: torch.Tensor | None = None):  # type: ignore[no-untyped-def]
    """The selection spelled out: within the range, higher score first, then lower position; the picks
    in ascending position with ``-1`` for ``-inf`` ones in place, then ``-1`` for slots past the range."""
    B, S, T = scores.shape
    kk = min(k, T)
    out = torch.full((B, S, kk), -1, dtype=torch.int32)
    for b in range(B):
        for s in range(S):
            lo = 0 if starts is None else max(int(starts[b, s]), 0)
            hi = T if ends is None else min(int(ends[b, s]), T)
            row = scores[b, s].tolist()
            best = sorted(sorted(range(lo, max(hi, lo)), key=lambda t: (-row[t], t))[:kk])
            for i, t in enumerate(best):
                out[b, s, i] = t if row[t] != NEG_INF else -1
    return out


@pytest.fixture(params=[1, 4096], ids=["cap1-overflow", "cap4096-buffer"])
def cap(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The candidate buffer's size: 1 always overflows (refinement streams the row), 4096 never does."""
    monkeypatch.setattr(tk, "_cand_cap", lambda: request.param)
    return request.param


@pytest.mark.parametrize("kind", ["randn", "ties", "signed-zeros"])
def test_select_equals_the_rule_index_for_index(cap: int, kind: str) -> None:
    B, S, T, k = 2, 3, 150, 20
    if kind == "randn":
        scores = torch.randn(B, S, T)
    elif kind == "ties":  # the threshold bin is one value held by ~40 keys
        scores = torch.randint(0, 4, (B, S, T)).float()
    else:
        scores = torch.where(
            torch.rand(B, S, T) < 0.7, torch.where(torch.rand(B, S, T) < 0.5, -0.0, 0.0), -1.0
        )
    scores[1, 2, 100:] = NEG_INF  # a row with a masked tail
    got = K.topk(scores, k, method="radix")
    assert torch.equal(got, rule(scores, k))


def test_ranges_fewer_keys_than_k_and_masked_rows(cap: int) -> None:
    B, S, T, k = 2, 4, 130, 16
    scores = torch.randint(-3, 3, (B, S, T)).float()
    scores[0, 1] = NEG_INF  # all -inf: picks are the lowest positions of the range, all -1
    scores[1, 3, :70] = NEG_INF  # fewer finite keys than k inside its range
    starts = torch.tensor([[0, 5, 120, -4], [10, 64, 3, 60]])
    ends = torch.tensor([[130, 90, 125, 40], [10, 200, 70, 80]])  # [1, 0] empty; [1, 1] past T
    got = K.topk(scores, k, starts=starts, ends=ends)
    want = rule(scores, k, starts, ends)
    assert torch.equal(got, want)
    assert (got[1, 0] == -1).all() and (got[0, 2, 5:] == -1).all(), "empty / short ranges pad with -1"
    # the torch method gives the same set (its -1s in any order)
    torch_picks = K.topk(scores, k, method="torch", starts=starts, ends=ends)
    assert torch.equal(torch_picks.sort(-1).values, want.sort(-1).values)


def test_one_sided_ranges_default_the_other_side() -> None:
    scores = torch.randn(1, 3, 90)
    ends = torch.tensor([[1, 45, 90]])
    starts = torch.tensor([[80, 3, 0]])
    assert torch.equal(K.topk(scores, 10, ends=ends), rule(scores, 10, None, ends))
    assert torch.equal(K.topk(scores, 10, starts=starts), rule(scores, 10, starts, None))


def test_large_k_writes_in_order_without_the_sort(monkeypatch: pytest.MonkeyPatch, cap: int) -> None:
    monkeypatch.setattr(tk, "SORT_MAX", 8)  # k = 30 takes the last-pass path
    scores = torch.randint(0, 5, (1, 3, 120)).float()
    scores[0, 0, 60:] = NEG_INF
    starts, ends = torch.tensor([[0, 20, 0]]), torch.tensor([[120, 110, 25]])
    assert torch.equal(K.topk(scores, 30, method="radix"), rule(scores, 30))
    assert torch.equal(K.topk(scores, 30, starts=starts, ends=ends), rule(scores, 30, starts, ends))


def test_default_rows_match_core_reference_as_sets() -> None:
    scores = torch.randn(2, 2, 300)
    got = K.topk(scores, 64, method="radix")
    assert torch.equal(got.sort(-1).values, select_topk_reference(scores, 64).sort(-1).values)


def test_range_arguments_are_checked() -> None:
    scores = torch.randn(2, 3, 40)
    with pytest.raises(ValueError, match=r"starts: expected shape \[B, S\]"):
        K.topk(scores, 4, starts=torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="ends: expected dtype"):
        K.topk(scores, 4, ends=torch.zeros(2, 3))


@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_rows_split_over_programs_equal_the_rule(
    monkeypatch: pytest.MonkeyPatch, cap: int, kind: str
) -> None:
    """Small-batch form: each row's histogram and collection passes run in 3 chunks (64 keys each in
    the interpreter), then one program per row finishes; the output is the same, index for index."""
    monkeypatch.setattr(tk, "_row_chunks", lambda rows, T: 3)
    B, S, T, k = 1, 3, 170, 24
    scores = torch.randn(B, S, T) if kind == "randn" else torch.randint(0, 4, (B, S, T)).float()
    scores[0, 1, 90:] = NEG_INF
    starts, ends = torch.tensor([[0, 30, 150]]), torch.tensor([[170, 140, 165]])  # row 2: fewer than k
    assert torch.equal(K.topk(scores, k, method="radix"), rule(scores, k))
    assert torch.equal(K.topk(scores, k, starts=starts, ends=ends), rule(scores, k, starts, ends))
