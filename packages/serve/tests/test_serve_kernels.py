"""The engine's cached decode through the Triton kernels (interpreter on CPU): the same tokens as
the torch path.

A GPU engine sends every layer's indexer scores, top-k and sparse attention through dsv-kernels,
with inputs the model-level parity test never builds: the decode staging rows (strided views into a
larger buffer), a different cached length per row, one query per row. Forcing ``DSV_KERNELS=triton``
here runs those kernels on exactly such inputs. The tiny preset's ``index_topk`` is cut to 8 so
short prompts take the sparse path. Skipped when dsv-kernels is not installed or not usable.

Run: ``pytest packages/serve/tests/test_serve_kernels.py``.
"""

from __future__ import annotations

import importlib
import os
import threading

import pytest
import torch

kernels = pytest.importorskip("dsv.kernels", reason="dsv-kernels is not installed")

# Triton decides at decoration time whether a kernel is interpreted: decorate them all now (at
# collection) with TRITON_INTERPRET=1, then give the variable back its old value, so it does not leak
# into other tests or their subprocesses; the tests here set it again while they run.
_before = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    importlib.import_module("dsv.kernels._api")
finally:
    if _before is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _before

from dsv.serve.engine import Engine, Finish, GenParams, TokenEvent  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::RuntimeWarning")]


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _run(
    model: torch.nn.Module, prompts: list[list[int]], *, staging: bool = True
) -> list[tuple[list[int], list[float]]]:
    engine = Engine.for_model(model, model.config, num_blocks=32, block_size=8, max_batch=4, staging=staging)  # type: ignore[attr-defined]
    out: list[tuple[list[int], list[float]]] = [([], []) for _ in prompts]
    done = [threading.Event() for _ in prompts]

    def collect(i: int):  # type: ignore[no-untyped-def]
        def cb(ev: TokenEvent | Finish) -> None:
            if isinstance(ev, Finish):
                done[i].set()
            else:
                out[i][0].append(ev.token)
                out[i][1].append(ev.logprob)

        return cb

    engine.start()
    try:
        for i, p in enumerate(prompts):
            engine.submit(p, GenParams(temperature=0.0, max_tokens=3), collect(i))
        assert all(d.wait(600) for d in done)
    finally:
        engine.stop()
    return out


def test_staged_decode_through_the_kernels_matches_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    ok, why = kernels.availability()
    if not ok:
        pytest.skip(f"dsv-kernels not usable here: {why}")
    from dsv.core.model import DSVForCausalLM
    from dsv.core.presets import tiny

    torch.manual_seed(0)
    model = DSVForCausalLM(tiny(index_topk=8, num_nextn_predict_layers=0)).eval()
    g = torch.Generator().manual_seed(2)
    # Different lengths: the rows of each decode step sit at different offsets of the staging buffer.
    prompts = [torch.randint(16, 1000, (n,), generator=g).tolist() for n in (13, 21)]
    calls: dict[str, int] = {}
    for name in ("indexer_scores", "topk", "sparse_mla"):
        real = getattr(kernels, name)

        def counted(*args, _real=real, _name=name, **kw):  # type: ignore[no-untyped-def]
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kw)

        monkeypatch.setattr(kernels, name, counted)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("DSV_KERNELS", backend)
        results[backend] = _run(model, prompts)
    # prefill and the two decode steps of each layer, on the triton run only
    assert set(calls) == {"indexer_scores", "topk", "sparse_mla"} and min(calls.values()) >= 4, calls
    for (want_tokens, want_lp), (got_tokens, got_lp) in zip(results["torch"], results["triton"], strict=True):
        assert got_tokens == want_tokens
        assert got_lp == pytest.approx(want_lp, abs=1e-4)


def test_paged_decode_reads_the_block_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding from the pool (``staging=False``, a GPU server's default): the indexer reads its keys and
    the sparse kernel the selected latent rows through each sequence's block table; no layer gathers."""
    ok, why = kernels.availability()
    if not ok:
        pytest.skip(f"dsv-kernels not usable here: {why}")
    from dsv.core.model import DSVForCausalLM
    from dsv.core.presets import tiny
    from dsv.serve.paged_cache import PagedBatchView

    torch.manual_seed(0)
    model = DSVForCausalLM(tiny(index_topk=8, num_nextn_predict_layers=0)).eval()
    g = torch.Generator().manual_seed(3)
    # Past the top-k (sparse from the first step) and below it (every visible key selected); block
    # size 8, so the selected rows of each sequence lie in several blocks.
    prompts = [torch.randint(16, 1000, (n,), generator=g).tolist() for n in (5, 19, 26)]
    calls = {"varlen": 0, "gathered": 0, "indexer_paged": 0}
    real_varlen, real_update = kernels.sparse_mla_varlen, PagedBatchView.update
    real_indexer = kernels.indexer_scores_paged

    def varlen(*args, **kw):  # type: ignore[no-untyped-def]
        calls["varlen"] += 1
        return real_varlen(*args, **kw)

    def indexer_paged(*args, **kw):  # type: ignore[no-untyped-def]
        calls["indexer_paged"] += 1
        return real_indexer(*args, **kw)

    def gathered(self, *args, **kw):  # type: ignore[no-untyped-def]
        calls["gathered"] += 1
        return real_update(self, *args, **kw)

    monkeypatch.setattr(kernels, "sparse_mla_varlen", varlen)
    monkeypatch.setattr(kernels, "indexer_scores_paged", indexer_paged)
    monkeypatch.setattr(PagedBatchView, "update", gathered)
    monkeypatch.setenv("DSV_KERNELS", "torch")
    want = _run(model, prompts, staging=False)
    assert calls["varlen"] == calls["indexer_paged"] == 0 and calls["gathered"] > 0
    calls["gathered"] = 0
    monkeypatch.setenv("DSV_KERNELS", "triton")
    got = _run(model, prompts, staging=False)
    # two layers, prefill + 2 decode steps; neither the latent rows nor the indexer keys gathered
    assert calls["gathered"] == 0 and calls["varlen"] >= 2 * 3 and calls["indexer_paged"] == calls["varlen"], calls
    for (want_tokens, want_lp), (got_tokens, got_lp) in zip(want, got, strict=True):
        assert got_tokens == want_tokens
        assert got_lp == pytest.approx(want_lp, abs=1e-4)


def test_paged_decode_without_an_indexer_attends_every_visible_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``deepseek_v3`` model (no indexer) decoding from the pool: each decode step's paged kernel gets
    every visible key of its row as the selection and gathers nothing (its prefill chunks still gather),
    and the tokens are the torch path's (dense attention)."""
    ok, why = kernels.availability()
    if not ok:
        pytest.skip(f"dsv-kernels not usable here: {why}")
    from dsv.core.model import DSVForCausalLM
    from dsv.core.presets import tiny
    from dsv.serve.paged_cache import PagedBatchView

    torch.manual_seed(0)
    model = DSVForCausalLM(tiny(model_type="deepseek_v3", num_nextn_predict_layers=0)).eval()
    assert not model.config.has_indexer
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(16, 1000, (n,), generator=g).tolist() for n in (6, 17)]
    calls = {"varlen": 0, "gathered": 0, "gathered_decode": 0}
    real_varlen, real_update = kernels.sparse_mla_varlen, PagedBatchView.update

    def varlen(*args, **kw):  # type: ignore[no-untyped-def]
        calls["varlen"] += 1
        return real_varlen(*args, **kw)

    def gathered(self, layer, latent, *args, **kw):  # type: ignore[no-untyped-def]
        calls["gathered"] += 1
        calls["gathered_decode"] += latent.shape[1] == 1
        return real_update(self, layer, latent, *args, **kw)

    monkeypatch.setattr(kernels, "sparse_mla_varlen", varlen)
    monkeypatch.setattr(PagedBatchView, "update", gathered)
    monkeypatch.setenv("DSV_KERNELS", "torch")
    want = _run(model, prompts, staging=False)
    assert calls["varlen"] == 0 and calls["gathered_decode"] > 0
    calls.update(gathered=0, gathered_decode=0)
    monkeypatch.setenv("DSV_KERNELS", "triton")
    got = _run(model, prompts, staging=False)
    # two layers, two decode steps at least; only the prefill forwards gathered
    assert calls["gathered_decode"] == 0 and calls["gathered"] > 0 and calls["varlen"] >= 2 * 2, calls
    for (want_tokens, want_lp), (got_tokens, got_lp) in zip(want, got, strict=True):
        assert got_tokens == want_tokens
        assert got_lp == pytest.approx(want_lp, abs=1e-4)
