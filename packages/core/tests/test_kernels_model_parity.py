"""Model-level parity: the tiny model with the Triton kernels forced (interpreter on CPU) gives the same
logits, DSA selections, indexer loss and gradients (backbone and indexer) as the torch path.

The sequence is longer than the tiny preset's ``index_topk`` so the sparse path (indexer -> top-k ->
sparse MLA) really runs. Indexer scores from the kernel and from the einsum reference differ in the
last bits, so a near-tie at the top-k threshold can flip one selected key; such a flip is checked to
be rare, and outputs are compared on each sequence's causal prefix before its first flip (which no
flip can influence). Skipped when dsv-kernels is not installed.

Run: ``pytest packages/core/tests/test_kernels_model_parity.py``.
"""

from __future__ import annotations

import importlib
import os

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

from dsv.core.model import DSVForCausalLM  # noqa: E402
from dsv.core.presets import tiny  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::RuntimeWarning")]


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _step(monkeypatch: pytest.MonkeyPatch, backend: str, model: DSVForCausalLM, ids: torch.Tensor):  # type: ignore[no-untyped-def]
    """One training-style step on ``backend``: forward with the indexer loss, backward of LM-side
    ``logsumexp`` plus the indexer loss. Returns the output and every parameter's gradient."""
    monkeypatch.setenv("DSV_KERNELS", backend)
    model.zero_grad(set_to_none=True)
    out = model(ids, return_indices=True, indexer_loss=True)
    assert out.indexer_loss is not None
    (out.logits.float().logsumexp(-1).mean() + out.indexer_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def test_tiny_model_kernels_match_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    # one step covers every kernel: indexer scores (forward, and its Triton backward through the
    # distillation loss), top-k, sparse MLA forward/backward, and the sparse-stage KL
    ok, why = kernels.availability()
    if not ok:
        pytest.skip(f"dsv-kernels not usable here: {why}")
    cfg = tiny(index_topk=16)  # a short sequence still takes the sparse path: the interpreter is slow
    torch.manual_seed(0)
    model = DSVForCausalLM(cfg)
    S = cfg.index_topk + 9  # longer than index_topk: the sparse path is taken
    ids = torch.randint(0, cfg.vocab_size, (2, S))
    ref, ref_grads = _step(monkeypatch, "torch", model, ids)
    got, got_grads = _step(monkeypatch, "triton", model, ids)
    # rows (b, t) whose selection differs in any layer
    flipped = torch.zeros(ids.shape, dtype=torch.bool)
    for a, b in zip(got.indices or [], ref.indices or [], strict=True):
        if a is not None and b is not None:
            flipped |= (a.sort(-1).values != b.sort(-1).values).any(-1)
    assert flipped.float().mean() <= 0.05, f"too many DSA selections differ: {flipped.nonzero().tolist()}"
    for row in range(ids.shape[0]):
        first = int(flipped[row].nonzero()[0]) if flipped[row].any() else S
        assert first > cfg.index_topk, "the compared prefix must include sparse positions"
        torch.testing.assert_close(
            got.logits[row, :first].detach(), ref.logits[row, :first].detach(), atol=2e-4, rtol=2e-4
        )
    tol = 1e-4 if not flipped.any() else 2e-2  # a flipped selection changes that row's sparse KL
    torch.testing.assert_close(got.indexer_loss.detach(), ref.indexer_loss.detach(), atol=tol, rtol=tol)
    if flipped.any():
        # gradients on the common prefix, where the selections are identical by construction
        cut = min(int(flipped[r].nonzero()[0]) if flipped[r].any() else S for r in range(ids.shape[0]))
        _, ref_grads = _step(monkeypatch, "torch", model, ids[:, :cut])
        _, got_grads = _step(monkeypatch, "triton", model, ids[:, :cut])
    assert got_grads.keys() == ref_grads.keys() and any("indexer" in n for n in ref_grads)
    for name, g in ref_grads.items():
        scale = g.abs().max().clamp_min(1e-6)
        err = ((got_grads[name] - g).abs().max() / scale).item()
        assert err < 1e-3, f"grad of {name}: normalised error {err:.2e}"
