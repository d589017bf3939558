"""One DSA selection in every backend: the torch reference, the compiled CPU kernel and the Triton
radix select (interpreter) pick the same keys, index for index, on inputs full of exact ties.

The rule (``dsv.core.attention.select_topk_reference``): higher score first, among equal scores the
lower key index first (``-0.0`` equals ``0.0``); masked keys are never picked over visible ones and
picks that land on them are ``-1``. With one or two index heads a quarter to a half of the indexer
scores are exactly 0 after the relu, so a backend that broke ties its own way attended over other
keys: a tiny model's logits differed by up to about 0.45 between the C kernel (serving) and the
torch path (training). The end-to-end tests below hold the logits of all three together and show
that a different tie order would fail them.

Run: ``pytest kernels/tests/test_dsa_ties.py``.
"""

from __future__ import annotations

import pytest
import torch

import dsv.kernels as K
import dsv.kernels.cpu as cpu
from dsv.core import attention as A
from dsv.core.cache import DenseKVCache
from dsv.core.model import DSVForCausalLM
from dsv.core.presets import tiny

if not cpu.availability()[0]:  # pragma: no cover - every machine that runs the suite has cc
    pytest.skip(f"CPU DSA kernel not available: {cpu.availability()[1]}", allow_module_level=True)

NEG_INF = float("-inf")
_REFERENCE = A.select_topk_reference  # (the end-to-end tests swap in another rule)


def rule(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The tie rule spelled out in Python: int32 ``[B, S, min(k, T)]`` in key order (see :func:`in_order`)."""
    B, S, T = scores.shape
    out = torch.empty(B, S, min(k, T), dtype=torch.int32)
    for b in range(B):
        for s in range(S):
            row = scores[b, s].tolist()
            best = sorted(sorted(range(T), key=lambda t: (-row[t], t))[:k])
            out[b, s] = torch.tensor([t if row[t] != NEG_INF else -1 for t in best], dtype=torch.int32)
    return out


def in_order(idx: torch.Tensor) -> torch.Tensor:
    """A selection in ascending key order with its ``-1`` picks last (masked keys come after the
    visible ones): the order the radix select writes, so any selection can be compared to it."""
    last = torch.iinfo(torch.int32).max
    ordered = torch.where(idx < 0, last, idx).sort(-1).values
    return ordered.masked_fill(ordered == last, -1)


def _indexer_inputs(kind: str, B: int, S: int, T: int, HI: int, DI: int = 16):  # type: ignore[no-untyped-def]
    """Index queries, keys and head weights whose scores tie a lot (see each kind)."""
    iq, ik, iw = torch.randn(B, S, HI, DI), torch.randn(B, T, DI), torch.randn(B, S, HI)
    if kind == "relu":  # about 90% of q.k below 0: the relu zeros most scores, as few heads do
        return iq.abs(), ik - 0.4, iw.abs()
    if kind == "negative-weights":  # every positive q.k scores below the zeros: ties at the top
        return iq, ik, -iw.abs()
    if kind == "small-integers":  # every product exact, a handful of distinct sums
        return iq.round().clamp(-1, 1), ik.round().clamp(-1, 1), iw.abs().round().clamp(0, 2)
    assert kind == "halves"  # multiples of 1/2: exact in any summation order, many duplicates
    return (iq * 2).round() / 2, (ik * 2).round() / 2, (iw.abs() * 2).round().clamp(1, 3) / 2


def _every_backend(iq, ik, iw, off, topk: int) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    scores = A.indexer_scores_reference(iq, ik, iw, off)
    B, S, _, _ = iq.shape
    q, kv = torch.randn(B, S, 2, 8), torch.randn(B, ik.shape[1], 8)
    return {
        "rule": rule(scores, topk),
        "torch reference": A.select_topk_reference(scores, topk),
        "dsv.kernels.topk(method=torch)": K.topk(scores, topk, method="torch"),
        "triton radix": K.topk(scores, topk, method="radix"),
        "cpu select": cpu.select(iq, ik, iw, off, topk=topk),
        "cpu sparse_attend": cpu.sparse_attend(iq, ik, iw, off, q, kv, topk=topk, sm_scale=0.3, d_v=8)[2],
    }


# Two heads only with exact inputs: two random float products per score may round a near-tie (not an
# exact tie) apart between the C kernel's loop and torch's bmm; exact ties are what the rule is about.
KINDS = [("relu", 1), ("negative-weights", 1), ("small-integers", 1), ("small-integers", 2), ("halves", 1),
         ("halves", 2)]  # fmt: skip


@pytest.mark.parametrize(("kind", "HI"), KINDS)
@pytest.mark.parametrize(
    ("B", "S", "T", "topk", "offsets"),
    [
        pytest.param(4, 1, 90, 8, [89, 40, 5, 0], id="decode-ragged"),
        pytest.param(2, 12, 60, 16, [48, 3], id="prefill-chunk"),
        pytest.param(1, 5, 30, 1, [25], id="k1"),
        pytest.param(1, 4, 6, 40, [2], id="k-above-T"),
    ],
)
def test_every_backend_selects_the_same_keys(
    kind: str, HI: int, B: int, S: int, T: int, topk: int, offsets: list[int]
) -> None:
    iq, ik, iw = _indexer_inputs(kind, B, S, T, HI)
    off = torch.tensor(offsets)
    picks = _every_backend(iq, ik, iw, off, topk)
    want = picks.pop("rule")
    for name, got in picks.items():
        assert got.dtype == torch.int32 and got.shape == want.shape, name
        assert torch.equal(in_order(got), want), name
    # The radix select writes in ascending index order: its output is the rule's, index for index
    assert torch.equal(picks["triton radix"], want)


@pytest.mark.parametrize(("kind", "HI"), KINDS)
def test_the_inputs_are_tie_heavy(kind: str, HI: int) -> None:
    """The inputs above tie where it matters: many scores are exactly 0, and many rows have their
    k-th and (k+1)-th largest scores equal (the prefill-chunk shape, k = 16)."""
    iq, ik, iw = _indexer_inputs(kind, 2, 12, 60, HI)
    scores = A.indexer_scores_reference(iq, ik, iw, torch.tensor([48, 3]))
    visible = scores > NEG_INF
    assert ((scores == 0) & visible).sum() > 0.25 * visible.sum()
    top = scores.topk(17, dim=-1).values
    assert int(((top[..., 15] == top[..., 16]) & (top[..., 16] > NEG_INF)).sum()) >= 4


def test_sparse_attention_is_over_the_same_keys() -> None:
    """With the same selection the C kernel's attention equals the torch chain's (it used to differ
    wherever a tie at the k-th score went another way)."""
    B, S, T, topk = 3, 6, 70, 12
    iq, ik, iw = _indexer_inputs("negative-weights", B, S, T, 1)
    q, kv = torch.randn(B, S, 4, 24), torch.randn(B, T, 24)
    off = torch.tensor([64, 30, 12])
    out, lse, idx = cpu.sparse_attend(iq, ik, iw, off, q, kv, topk=topk, sm_scale=0.3, d_v=20)
    ref_idx = A.select_topk_reference(A.indexer_scores_reference(iq, ik, iw, off), topk)
    ref_out, ref_lse = A.sparse_mla_reference(q, kv, ref_idx, 0.3, 20)
    assert torch.equal(in_order(idx), in_order(ref_idx))
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_signed_zeros_and_masked_keys_in_the_radix_select() -> None:
    g = torch.Generator().manual_seed(5)
    B, S, T = 2, 6, 200  # several 64-wide blocks in the interpreter
    zeros = torch.where(torch.rand(B, S, T, generator=g) < 0.5, -0.0, 0.0)
    scores = torch.where(torch.rand(B, S, T, generator=g) < 0.8, zeros, torch.randn(B, S, T, generator=g))
    # the lowest finite score still beats a masked key; rows that see fewer keys than k get -1s
    scores[0, 0] = torch.finfo(torch.float32).min
    scores = scores.masked_fill(
        ~A.causal_key_mask(torch.tensor([150, 20]), S, T, B, torch.device("cpu")), NEG_INF
    )
    for k in (1, 24, 170):
        want = rule(scores, k)
        assert torch.equal(K.topk(scores, k, method="radix"), want)
        assert torch.equal(in_order(A.select_topk_reference(scores, k)), want)
        assert torch.equal(in_order(K.topk(scores, k, method="torch")), want)
    assert rule(scores, 170)[0, 0].tolist() == list(range(151)) + [-1] * 19


# ----------------------------------------------------------------------------- end to end


def _model(index_heads: int) -> DSVForCausalLM:
    torch.manual_seed(index_heads)
    return DSVForCausalLM(tiny(index_n_heads=index_heads, index_topk=8)).eval()


def _full(model: DSVForCausalLM, ids: torch.Tensor, backend: str, mp: pytest.MonkeyPatch) -> torch.Tensor:
    mp.setenv("DSV_KERNELS", backend)
    with torch.inference_mode():
        return model(ids).logits


def _cached(model: DSVForCausalLM, ids: torch.Tensor, backend: str, mp: pytest.MonkeyPatch) -> torch.Tensor:
    """Prefill 10 tokens, then one token a step, as generation and the serve engine run it."""
    mp.setenv("DSV_KERNELS", backend)
    B, S = ids.shape
    cache = DenseKVCache(model.config, B, S)
    with torch.inference_mode():
        logits = [model(ids[:, :10], cache=cache).logits]
        logits += [model(ids[:, t : t + 1], cache=cache).logits for t in range(10, S)]
    return torch.cat(logits, 1)


def _highest_index_ties(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The opposite tie rule (among equal scores the higher index first): what any other order
    would do to the tied rows."""
    T = scores.shape[-1]
    idx = _REFERENCE(scores.flip(-1), k)
    return torch.where(idx >= 0, T - 1 - idx, idx)


@pytest.mark.parametrize("index_heads", [1, 2])
def test_tiny_model_logits_agree_between_the_cpu_kernel_and_torch(
    monkeypatch: pytest.MonkeyPatch, index_heads: int
) -> None:
    """Sequences of 40 tokens with index_topk 8: every layer attends sparsely. The serve path (the C
    kernel, cached decode) and the training forward (torch, one pass) give the same logits."""
    model = _model(index_heads)
    ids = torch.randint(0, model.config.vocab_size, (3, 40))
    calls = []
    real = cpu.sparse_attend
    monkeypatch.setattr(cpu, "sparse_attend", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    A._cpu_kernels_module.cache_clear()
    torch_full = _full(model, ids, "torch", monkeypatch)
    assert not calls
    kernel_full = _full(model, ids, "auto", monkeypatch)
    kernel_cached = _cached(model, ids, "auto", monkeypatch)
    assert len(calls) >= 2 * 31, "every layer's forward should go through the CPU kernel"
    torch.testing.assert_close(kernel_full, torch_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernel_cached, torch_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_cached(model, ids, "torch", monkeypatch), torch_full, atol=1e-5, rtol=1e-5)

    # The check has teeth: with ties broken the other way on the torch side, the logits move by far
    # more than the tolerance (torch.topk's own order moved them by up to 0.45 on these configs).
    monkeypatch.setattr(A, "select_topk_reference", _highest_index_ties)
    other = _full(model, ids, "torch", monkeypatch)
    assert (other - kernel_full).abs().max() > 0.05


def test_tiny_model_logits_agree_with_the_triton_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Triton kernels (indexer, radix select, sparse MLA, in the interpreter) give the same
    logits as the torch path and the C kernel on a one-index-head model."""
    model = _model(1)
    ids = torch.randint(0, model.config.vocab_size, (1, 24))
    torch_full = _full(model, ids, "torch", monkeypatch)
    torch.testing.assert_close(_full(model, ids, "triton", monkeypatch), torch_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_full(model, ids, "auto", monkeypatch), torch_full, atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(A, "select_topk_reference", _highest_index_ties)
    assert (_full(model, ids, "torch", monkeypatch) - torch_full).abs().max() > 0.05
