"""Radix top-k kernel vs. torch.topk: same index sets (order ignored), -1 for masked picks.

Run: ``pytest kernels/tests/test_kernels_topk.py`` (interpreter, CPU).
"""

from __future__ import annotations

import pytest
import torch

import dsv.kernels as K
from dsv.core.attention import causal_key_mask, select_topk_reference


def _sorted(x: torch.Tensor) -> torch.Tensor:
    return x.sort(dim=-1).values


@pytest.mark.parametrize(
    ("B", "S", "T", "k"),
    [
        pytest.param(2, 5, 63, 7, id="T63-k7"),
        pytest.param(1, 3, 200, 40, id="T200-k40-multiblock"),
        pytest.param(2, 4, 17, 40, id="k-larger-than-T"),
        pytest.param(1, 2, 33, 1, id="k1"),
    ],
)
def test_topk_matches_reference_set(B: int, S: int, T: int, k: int) -> None:
    scores = torch.randn(B, S, T)
    got = K.topk(scores, k, method="radix")
    assert got.dtype == torch.int32 and got.shape == (B, S, min(k, T))
    assert torch.equal(_sorted(got), _sorted(select_topk_reference(scores, k)))


def test_topk_causal_rows_mark_masked_picks() -> None:
    B, S, T, k = 2, 9, 9, 6
    off = torch.tensor([0, 3])
    scores = torch.randn(B, S, T).masked_fill(
        ~causal_key_mask(off, S, T, B, torch.device("cpu")), float("-inf")
    )
    got = K.topk(scores, k, method="radix")
    want = select_topk_reference(scores, k)
    assert torch.equal(_sorted(got), _sorted(want))
    assert (got[0, 0] == -1).sum() == k - 1, "query 0 sees one key; the other picks are -1"


def test_topk_fully_masked_row_and_negative_scores() -> None:
    scores = -torch.rand(1, 3, 50) * 1e6  # all negative: exercises the sign flip of the radix keys
    scores[0, 1] = float("-inf")
    got = K.topk(scores, 10, method="radix")
    assert torch.equal(got[0, 1], torch.full((10,), -1, dtype=torch.int32))
    assert torch.equal(_sorted(got), _sorted(select_topk_reference(scores, 10)))


def test_topk_ties_pick_equal_values_once_each() -> None:
    scores = torch.randint(0, 4, (2, 3, 70)).float()  # heavy ties at the threshold
    got = K.topk(scores, 25, method="radix").long()
    want = select_topk_reference(scores, 25).long()
    assert torch.equal(_sorted(scores.gather(-1, got)), _sorted(scores.gather(-1, want)))
    assert all(row.unique().numel() == 25 for row in got.view(-1, 25)), "indices are distinct"


def test_topk_methods_agree_and_bad_inputs() -> None:
    scores = torch.randn(2, 3, 40)
    assert torch.equal(_sorted(K.topk(scores, 9, method="torch")), _sorted(K.topk(scores, 9)))
    with pytest.raises(ValueError, match="k: expected an int >= 1"):
        K.topk(scores, 0)
    with pytest.raises(ValueError, match=r"scores: expected shape \[B, S, T\]"):
        K.topk(scores[0], 3)
    with pytest.raises(ValueError, match="method"):
        K.topk(scores, 3, method="bitonic")
