"""The compiled CPU DSA call (dsv.kernels.cpu) against the torch chain it replaces:
``indexer_scores_reference -> select_topk_reference -> sparse_mla_reference``.

Covers decode and prefill shapes, rows that see fewer keys than ``K`` (``-1`` picks), strided latent
rows (views into a larger buffer, as the serving engine's staging rows are), query chunking, exact
ties (the relu in the indexer makes many scores exactly 0), the build (cache, missing compiler),
bad inputs, dsv.core's dispatch and the tiny model's decode with and without it.

Run: ``pytest kernels/tests/test_cpu_dsa.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dsv.kernels.cpu as cpu
from dsv.core import attention
from dsv.core.attention import indexer_scores_reference, select_topk_reference, sparse_mla_reference

if not cpu.availability()[0]:  # pragma: no cover - every machine that runs the suite has cc
    pytest.skip(f"CPU DSA kernel not available: {cpu.availability()[1]}", allow_module_level=True)


def _inputs(B: int, S: int, T: int, *, HI: int = 4, DI: int = 16, H: int = 3, D: int = 24, pad: int = 0):
    iq, ik, iw = torch.randn(B, S, HI, DI), torch.randn(B, T, DI), torch.randn(B, S, HI)
    q = torch.randn(B, S, H, D)
    # Latent rows as a view into a wider buffer: row b starts (T + pad) rows after row b-1.
    kv = torch.randn(B, T + pad, D)[:, :T]
    return iq, ik, iw, q, kv


def _picked(scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The scores ``idx`` selects, sorted (``-inf`` for a ``-1`` pick)."""
    got = scores.gather(-1, idx.long().clamp_min(0)).masked_fill(idx < 0, float("-inf"))
    return got.sort(-1).values


def _chain(iq, ik, iw, off, q, kv, topk: int, d_v: int):  # type: ignore[no-untyped-def]
    scores = indexer_scores_reference(iq, ik, iw, off)
    idx = select_topk_reference(scores, topk)
    out, lse = sparse_mla_reference(q, kv, idx, 0.3, d_v)
    return out, lse, idx, scores


@pytest.mark.parametrize(
    ("B", "S", "T", "topk", "offsets", "pad"),
    [
        pytest.param(5, 1, 70, 8, [69, 3, 40, 0, 7], 9, id="decode-ragged-rows"),
        pytest.param(2, 13, 50, 16, [37, 10], 0, id="prefill-chunk"),
        pytest.param(1, 6, 6, 40, [0], 0, id="topk-above-T"),
        pytest.param(3, 2, 33, 1, [31, 5, 0], 4, id="k1"),
    ],
)
def test_matches_the_torch_chain(B: int, S: int, T: int, topk: int, offsets: list[int], pad: int) -> None:
    iq, ik, iw, q, kv = _inputs(B, S, T, pad=pad)
    off = torch.tensor(offsets)
    out, lse, idx = cpu.sparse_attend(iq, ik, iw, off, q, kv, topk=topk, sm_scale=0.3, d_v=20)
    ref_out, ref_lse, ref_idx, scores = _chain(iq, ik, iw, off, q, kv, topk, 20)
    K = min(topk, T)
    assert out.shape == (B, S, 3, 20) and lse.shape == (B, S, 3) and idx.shape == (B, S, K)
    assert idx.dtype == torch.int32
    # The same selected scores (four float products per score: the kernel's sum and torch's bmm may
    # round a near-tie apart; exact ties go to the lower index in both, see test_dsa_ties.py) ...
    assert torch.equal(_picked(scores, idx), _picked(scores, ref_idx))
    # ... the attention over that selection, and the chain's result wherever the selection is its own
    same = (idx.sort(-1).values == ref_idx.sort(-1).values).all(-1)
    assert same.float().mean() > 0.8
    own_out, own_lse = sparse_mla_reference(q, kv, idx, 0.3, 20)
    torch.testing.assert_close(out, own_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, own_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[same], ref_out[same], atol=1e-5, rtol=1e-5)
    # queries that see fewer than K keys pick -1 for the rest
    visible = (off.view(B, 1) + torch.arange(S).view(1, S) + 1).clamp(max=T)
    assert torch.equal((idx >= 0).sum(-1), visible.clamp(max=K))


def test_select_alone_matches_the_torch_selection() -> None:
    iq, ik, iw, q, kv = _inputs(3, 4, 45)
    off = torch.tensor([41, 2, 20])
    idx = cpu.select(iq, ik, iw, off, topk=12)
    _, _, ref_idx, scores = _chain(iq, ik, iw, off, q, kv, 12, 24)
    assert idx.shape == ref_idx.shape and idx.dtype == torch.int32
    assert torch.equal(_picked(scores, idx), _picked(scores, ref_idx))
    # the same selection the fused call makes
    assert torch.equal(idx, cpu.sparse_attend(iq, ik, iw, off, q, kv, topk=12, sm_scale=0.3, d_v=24)[2])


def test_query_chunks_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    iq, ik, iw, q, kv = _inputs(2, 11, 40)
    off = torch.tensor([29, 3])
    whole = cpu.sparse_attend(iq, ik, iw, off, q, kv, topk=8, sm_scale=0.3, d_v=24)
    monkeypatch.setattr(cpu, "_RAW_CHUNK_ELEMS", 1)  # one query per chunk
    for a, b in zip(
        cpu.sparse_attend(iq, ik, iw, off, q, kv, topk=8, sm_scale=0.3, d_v=24), whole, strict=True
    ):
        assert torch.equal(a, b)


def test_ties_select_keys_with_the_same_scores() -> None:
    # Integer inputs: many scores are exactly equal (most are 0 after the relu); among equal scores
    # both pick the lower indices, so the selections are the same keys.
    B, S, T, topk = 2, 3, 60, 10
    iq, ik, iw, q, kv = _inputs(B, S, T)
    iq, ik, iw = iq.round().clamp(-1, 1), ik.round().clamp(-1, 1), iw.abs().round().clamp(0, 1)
    off = torch.tensor([57, 20])
    out, lse, idx = cpu.sparse_attend(iq, ik, iw, off, q, kv, topk=topk, sm_scale=0.3, d_v=24)
    _, _, ref_idx, scores = _chain(iq, ik, iw, off, q, kv, topk, 24)
    assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    assert (scores == 0).float().mean() > 0.2, "the inputs should produce ties"
    again_out, again_lse = sparse_mla_reference(q, kv, idx, 0.3, 24)
    torch.testing.assert_close(out, again_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, again_lse, atol=1e-5, rtol=1e-5)



def _scored_rows(kind: str) -> tuple[torch.Tensor, ...]:
    """Inputs whose index scores take each path of the kernel's top-k."""
    B, S, T = 2, 3, 3000
    iq, ik, iw, q, kv = _inputs(B, S, T)
    if kind == "all-equal":  # every score 0: the lowest visible positions
        iq = torch.zeros_like(iq)
    elif kind == "infinite":  # some keys score +inf (kept, whatever their neighbours)
        iq[..., 0], iw = iq[..., 0].abs() + 1, iw.abs() + 0.1
        ik[:, [5, 1700, 2900], 0] = float("inf")
    return iq, ik, iw, q, kv


@pytest.mark.parametrize("kind", ["spread", "all-equal", "infinite"])
def test_long_rows_select_what_the_torch_chain_selects(kind: str) -> None:
    # Thousands of keys: the linear bins, the boundary bin settled by radix passes, and the rows
    # that go to radix passes whole (no spread, or an infinite score).
    iq, ik, iw, q, kv = _scored_rows(kind)
    off = torch.tensor([2990, 1500])
    idx = cpu.select(iq, ik, iw, off, topk=64)
    _, _, ref_idx, scores = _chain(iq, ik, iw, off, q, kv, 64, 24)
    assert torch.equal(_picked(scores, idx), _picked(scores, ref_idx))
    if kind != "spread":  # exact ties or infinities: the very same keys
        assert torch.equal(idx.sort(-1).values, ref_idx.sort(-1).values)
    if kind == "all-equal":
        assert torch.equal(idx.sort(-1).values[0, 0], torch.arange(64, dtype=torch.int32))
    if kind == "infinite":
        assert all(k in idx[0, 2].tolist() for k in (5, 1700, 2900))


def test_softmax_over_a_wide_logit_range_matches_the_reference() -> None:
    # Logits hundreds apart: the kernel's exp works down to its floor of e^-87.3 and below it
    # contributes weights under 1e-37, as expf's would. (A logit of several hundred summed in another
    # order differs in its last bits, a few 1e-5 of weight: hence the looser tolerance.)
    iq, ik, iw, q, kv = _inputs(2, 4, 80)
    q = q * 40
    off = torch.tensor([76, 30])
    out, lse, idx = cpu.sparse_attend(iq, ik, iw, off, q, kv, topk=16, sm_scale=1.0, d_v=24)
    want_out, want_lse = sparse_mla_reference(q, kv, idx, 1.0, 24)
    torch.testing.assert_close(out, want_out, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(lse, want_lse, atol=2e-4, rtol=1e-5)
    rows = torch.stack([kv[b][idx[b].long()] for b in range(2)])  # (B, S, K, D): every pick is visible here
    logits = torch.einsum("bshd,bskd->bshk", q, rows)
    assert (logits.amax(-1) - logits.amin(-1)).max() > 87.3, "some weights should fall below the exp floor"

def test_bad_inputs_are_named() -> None:
    iq, ik, iw, q, kv = _inputs(2, 1, 10)
    off = torch.tensor([9, 9])
    with pytest.raises(TypeError, match="q: expected a float32 CPU tensor"):
        cpu.sparse_attend(iq, ik, iw, off, q.bfloat16(), kv, topk=4, sm_scale=0.3, d_v=8)
    with pytest.raises(ValueError, match="shapes do not agree"):
        cpu.sparse_attend(iq, ik[:, :5], iw, off, q, kv, topk=4, sm_scale=0.3, d_v=8)
    with pytest.raises(ValueError, match=r"d_v: expected 1\.\.24"):
        cpu.sparse_attend(iq, ik, iw, off, q, kv, topk=4, sm_scale=0.3, d_v=25)
    with pytest.raises(ValueError, match="kv: each row's values must be contiguous"):
        cpu.sparse_attend(iq, ik, iw, off, q, kv.transpose(1, 2).contiguous().transpose(1, 2), topk=4,
                          sm_scale=0.3, d_v=8)  # fmt: skip


def test_build_is_cached_and_a_missing_compiler_is_reported(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DSV_CACHE_DIR", str(tmp_path))
    cpu._library.cache_clear()
    try:
        ok, why = cpu.availability()
        built = list((tmp_path / "kernels").glob("dsa-*.so"))
        assert ok and len(built) == 1 and str(built[0]) in why
        stamp = built[0].stat().st_mtime_ns
        cpu._library.cache_clear()
        assert cpu.availability()[0] and built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
        assert not list((tmp_path / "kernels").glob("*.tmp.so"))

        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        monkeypatch.setenv("DSV_CACHE_DIR", str(tmp_path / "other"))
        cpu._library.cache_clear()
        ok, why = cpu.availability()
        assert not ok and "did not compile" in why and "no-such-cc" in why
        with pytest.raises(RuntimeError, match="did not compile"):
            cpu.sparse_attend(*_inputs(1, 1, 4)[:3], 3, *_inputs(1, 1, 4)[3:], topk=2, sm_scale=0.3, d_v=8)
    finally:
        monkeypatch.undo()
        cpu._library.cache_clear()


def test_core_dispatch_uses_it_at_cpu_inference_only(monkeypatch: pytest.MonkeyPatch) -> None:
    iq, ik, iw, q, kv = _inputs(2, 1, 30)
    off = torch.tensor([29, 12])
    calls = []
    real = cpu.sparse_attend
    monkeypatch.setattr(cpu, "sparse_attend", lambda *a, **k: calls.append(1) or real(*a, **k))
    attention._cpu_kernels_module.cache_clear()
    ok, why = attention.prepare_cpu_kernel()  # what the serve engine calls at start
    assert ok and "compiled with" in why
    fused = attention.fused_sparse_attention(iq, ik, iw, off, q, kv, 8, 0.3, 24)
    assert calls == [1]
    monkeypatch.setenv("DSV_KERNELS", "torch")
    chained = attention.fused_sparse_attention(iq, ik, iw, off, q, kv, 8, 0.3, 24)
    assert calls == [1]
    for a, b in zip(fused[:2], chained[:2], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    monkeypatch.delenv("DSV_KERNELS")
    # Wide attention: the kernel selects, torch attends (same result).
    monkeypatch.setattr(attention, "FUSED_ATTEND_MAX", 0)
    selected = []
    real_select = cpu.select
    monkeypatch.setattr(cpu, "select", lambda *a, **k: selected.append(1) or real_select(*a, **k))
    split = attention.fused_sparse_attention(iq, ik, iw, off, q, kv, 8, 0.3, 24)
    assert calls == [1] and selected == [1]
    for a, b in zip(split, fused, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    q.requires_grad_(True)  # training: the chain, which autograd can go through
    out, _, _ = attention.fused_sparse_attention(iq, ik, iw, off, q, kv, 8, 0.3, 24)
    assert calls == [1] and selected == [1] and out.requires_grad
    assert not attention.fused_sparse_ok(q.detach().bfloat16(), kv.bfloat16())


def test_tiny_model_decode_matches_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from dsv.core.cache import DenseKVCache
    from dsv.core.model import DSVForCausalLM
    from dsv.core.presets import tiny

    cfg = tiny(index_topk=8)
    model = DSVForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 30))

    def decode(backend: str) -> torch.Tensor:
        monkeypatch.setenv("DSV_KERNELS", backend)
        cache = DenseKVCache(cfg, 3, 40)
        with torch.inference_mode():
            logits = [model(ids[:, :20], cache=cache).logits[:, -1]]
            for t in range(20, 30):  # one token a step: the absorbed decode path
                logits.append(model(ids[:, t : t + 1], cache=cache).logits[:, -1])
        return torch.stack(logits, 1)

    calls = []
    real = cpu.sparse_attend
    monkeypatch.setattr(cpu, "sparse_attend", lambda *a, **k: calls.append(1) or real(*a, **k))
    attention._cpu_kernels_module.cache_clear()
    fused = decode("auto")
    assert len(calls) >= 2 * 10, "every layer's decode step should go through the CPU kernel"
    torch.testing.assert_close(fused, decode("torch"), atol=1e-4, rtol=1e-4)
