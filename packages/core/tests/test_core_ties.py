"""The DSA selection's tie rule on the torch path: higher score first, among equal scores the lower
key index first, masked keys never over visible ones and ``-1`` where a pick lands on one.

With one or two index heads a quarter to a half of the indexer scores are exactly 0 after the relu,
so which of several equal keys is picked changes the attention. These tests hold
``select_topk_reference`` to a plain sort by ``(-score, index)`` on tie-heavy rows, and hold the
model's selections and logits equal between the full forward, the incremental cached forward and
the training forward (whose selection the indexer KL loss uses). The compiled CPU kernel and the
Triton kernel are held to the same rule in ``kernels/tests/test_dsa_ties.py``.

Run: ``pytest packages/core/tests/test_core_ties.py``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv.core import attention as A
from dsv.core.cache import DenseKVCache
from dsv.core.model import DSVForCausalLM
from dsv.core.presets import tiny

NEG_INF = float("-inf")


def rule(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The tie rule spelled out in Python, row by row: int32 ``[B, S, min(k, T)]``, ascending per row."""
    B, S, T = scores.shape
    K = min(k, T)
    out = torch.empty(B, S, K, dtype=torch.int32)
    for b in range(B):
        for s in range(S):
            row = scores[b, s].tolist()  # (Python compares -0.0 == 0.0, as torch does)
            best = sorted(range(T), key=lambda t: (-row[t], t))[:K]
            picks = sorted(t if row[t] != NEG_INF else -1 for t in best)
            out[b, s] = torch.tensor(picks, dtype=torch.int32)
    return out


def ascending(idx: torch.Tensor) -> torch.Tensor:
    return idx.sort(-1).values


def boundary_ties(scores: torch.Tensor, k: int) -> int:
    """How many rows have their k-th and (k+1)-th largest scores equal and finite: the rows whose
    selection depends on the tie rule."""
    top = scores.topk(k + 1, dim=-1).values
    return int(((top[..., k - 1] == top[..., k]) & (top[..., k] > NEG_INF)).sum())


def _tie_heavy_scores(kind: str, B: int, S: int, T: int, g: torch.Generator) -> torch.Tensor:
    if kind == "integers":  # a handful of distinct values: ties everywhere, at every boundary
        return torch.randint(-2, 3, (B, S, T), generator=g).float()
    if kind == "relu":  # one index head: about half the scores exactly 0
        return torch.randn(B, S, T, generator=g).relu()
    if kind == "negative-weight":  # one head with a negative weight: every nonzero score is below 0
        return -torch.randn(B, S, T, generator=g).relu()
    # signed zeros: -0.0 and +0.0 are the same score
    zeros = torch.where(torch.rand(B, S, T, generator=g) < 0.5, -0.0, 0.0)
    return torch.where(torch.rand(B, S, T, generator=g) < 0.7, zeros, torch.randn(B, S, T, generator=g))


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["integers", "relu", "negative-weight", "signed-zeros"]),
    B=st.integers(1, 3),
    S=st.integers(1, 8),
    T=st.integers(1, 70),
    k=st.integers(1, 80),
    seed=st.integers(0, 2**16),
)
def test_selection_follows_the_tie_rule(kind: str, B: int, S: int, T: int, k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = _tie_heavy_scores(kind, B, S, T, g)
    # ragged causal rows, some seeing fewer keys than k (and a row that sees none)
    offset = torch.randint(-1, T, (B,), generator=g)
    scores = scores.masked_fill(~A.causal_key_mask(offset, S, T, B, torch.device("cpu")), NEG_INF)
    got = A.select_topk_reference(scores, k)
    assert got.dtype == torch.int32 and got.shape == (B, S, min(k, T))
    assert torch.equal(ascending(got), rule(scores, k))


def test_boundary_ties_take_the_lowest_indices() -> None:
    # 10 keys: 3 above 0, then seven 0s (some -0.0) at indices 1..9 minus the three; k = 6
    row = torch.tensor([0.0, 5.0, -0.0, 0.0, 7.0, 0.0, -0.0, 9.0, 0.0, 0.0]).view(1, 1, 10)
    assert ascending(A.select_topk_reference(row, 6)).tolist() == [[[0, 1, 2, 3, 4, 7]]]
    # every score equal: the first k keys
    flat = torch.zeros(2, 3, 50)
    assert torch.equal(ascending(A.select_topk_reference(flat, 7)), torch.arange(7).expand(2, 3, 7).int())


def test_masked_keys_never_win_and_are_minus_one() -> None:
    # Visible keys with the lowest finite score still beat masked ones; masked picks are -1.
    T = 12
    scores = torch.full((1, 4, T), torch.finfo(torch.float32).min)
    visible = A.causal_key_mask(torch.tensor([2]), 4, T, 1, torch.device("cpu"))
    scores = scores.masked_fill(~visible, NEG_INF)
    got = ascending(A.select_topk_reference(scores, 5))
    assert got.tolist() == [[[-1, -1, 0, 1, 2], [-1, 0, 1, 2, 3], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]]


def test_the_dispatch_and_the_reference_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    scores = torch.randint(0, 3, (2, 5, 40)).float()
    monkeypatch.setenv("DSV_KERNELS", "torch")
    assert torch.equal(A.select_topk(scores, 9), A.select_topk_reference(scores, 9))


def _tie_heavy_model(index_heads: int) -> DSVForCausalLM:
    torch.manual_seed(index_heads)
    return DSVForCausalLM(tiny(index_n_heads=index_heads, index_topk=8)).eval()


@pytest.mark.parametrize("index_heads", [1, 2])
def test_full_incremental_and_training_forwards_select_the_same_keys(
    monkeypatch: pytest.MonkeyPatch, index_heads: int
) -> None:
    """The serving path (cached, a token at a time), the full forward and the training forward (with
    the indexer KL loss, which uses the selection) pick the same keys; their scores differ only by
    float rounding (matmul shapes differ), and exact ties are broken the same way."""
    monkeypatch.setenv("DSV_KERNELS", "torch")
    model = _tie_heavy_model(index_heads)
    cfg = model.config
    B, S, prompt = 3, 40, 10
    ids = torch.randint(0, cfg.vocab_size, (B, S))
    scores: list[torch.Tensor] = []
    real_scores = A.indexer_scores

    def recorded(*args: object, **kwargs: object) -> torch.Tensor:
        scores.append(real_scores(*args, **kwargs))  # type: ignore[arg-type]
        return scores[-1]

    monkeypatch.setattr(A, "indexer_scores", recorded)
    with torch.inference_mode():
        full = model(ids, return_indices=True)
    assert sum(boundary_ties(s, cfg.index_topk) for s in scores) > 20, "the config should tie at the boundary"

    cache = DenseKVCache(cfg, B, S)
    with torch.inference_mode():
        steps = [model(ids[:, :prompt], cache=cache, return_indices=True)]
        steps += [model(ids[:, t : t + 1], cache=cache, return_indices=True) for t in range(prompt, S)]
    torch.testing.assert_close(torch.cat([o.logits for o in steps], 1), full.logits, atol=1e-5, rtol=1e-5)
    assert full.indices is not None
    for layer, whole in enumerate(full.indices):
        assert whole is not None
        pieces = [o.indices[layer] for o in steps if o.indices is not None]
        assert torch.equal(ascending(torch.cat(pieces, 1)), ascending(whole)), f"layer {layer}"

    with torch.enable_grad():
        trained = model(ids, return_indices=True, indexer_loss=True)
    assert trained.indexer_loss is not None and trained.indexer_loss.requires_grad
    assert trained.indices is not None
    for a, b in zip(trained.indices, full.indices, strict=True):
        assert a is not None and b is not None and torch.equal(ascending(a), ascending(b))
