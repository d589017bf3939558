"""dsv.train.losses: the LossTerms container, the cross-entropy terms against hand-worked values, and
lm_terms against the loss train() used to sum inline (same value, same gradients, same logs).

Run: ``pytest packages/train/tests/test_train_losses.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsv.core import presets
from dsv.core.model import DSVForCausalLM
from dsv.train.data import IGNORE_INDEX
from dsv.train.losses import LossTerms, lm_terms, mtp_loss, next_token_loss


def test_loss_terms_total_metrics_and_stacking() -> None:
    a = torch.tensor(3.0, requires_grad=True)
    b = torch.tensor(4.0, requires_grad=True)
    terms = LossTerms().add("a", a * 1.0, weight=2.0).add("b", b * 1.0, weight=0.5)
    terms.note("share", torch.tensor(0.25)).note("count", 7)
    assert list(terms) == ["a", "b"] and len(terms) == 2 and "a" in terms and "share" not in terms
    total = terms.total()
    assert total.item() == 2.0 * 3.0 + 0.5 * 4.0
    total.backward()
    assert a.grad is not None and b.grad is not None
    assert (a.grad.item(), b.grad.item()) == (2.0, 0.5)  # each term's gradient carries its weight
    # the logs hold each term unweighted, then the statistics
    assert terms.metrics() == {"a": 3.0, "b": 4.0, "share": 0.25, "count": 7.0}
    assert terms.weight("b") == 0.5 and terms["a"].item() == 3.0
    vec = terms.stacked(["b", "missing", "a"])
    assert vec.dtype == torch.float64 and vec.tolist() == [4.0, 0.0, 3.0] and not vec.requires_grad


def test_loss_terms_refuse_misuse() -> None:
    terms = LossTerms().add("lm", torch.tensor(1.0))
    with pytest.raises(ValueError, match="'lm' is already recorded"):
        terms.add("lm", torch.tensor(2.0))
    with pytest.raises(ValueError, match="'lm' is already recorded"):
        terms.note("lm", 2.0)
    with pytest.raises(ValueError, match="must be a scalar tensor"):
        terms.add("vec", torch.ones(3))
    with pytest.raises(ValueError, match="no loss terms"):
        LossTerms().total()


def test_next_token_loss_by_hand() -> None:
    # position 0: logits (0, 0), target 0 -> ln 2; position 1: logits (ln 3, 0), target 1 -> ln 4
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    assert next_token_loss(logits, torch.tensor([[0, 1]]), 1.0).item() == pytest.approx(
        math.log(8.0), abs=1e-6
    )
    assert next_token_loss(logits, torch.tensor([[0, 1]]), 0.5).item() == pytest.approx(
        math.log(8.0) / 2, abs=1e-6
    )
    ignored = torch.tensor([[0, IGNORE_INDEX]])
    assert next_token_loss(logits, ignored, 1.0).item() == pytest.approx(math.log(2.0), abs=1e-6)


def test_mtp_loss_aligns_each_depth_one_token_further() -> None:
    labels = torch.tensor([[0, 1, 1]])
    # depth 0 predicts labels[:, 1:] = (1, 1) with p(1) = 3/4 twice -> 2 ln(4/3) = 0.5753641
    d0 = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    # depth 1 predicts labels[:, 2:] = (1,) with p(1) = 1/4 -> ln 4 = 1.3862944
    d1 = torch.tensor([[[math.log(3.0), 0.0]]])
    assert mtp_loss([d0], labels, 1.0).item() == pytest.approx(0.5753641, abs=1e-6)
    assert mtp_loss([d0, d1], labels, 1.0).item() == pytest.approx((0.5753641 + 1.3862944) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="at least one depth"):
        mtp_loss([], labels, 1.0)


@pytest.fixture
def forward() -> tuple[DSVForCausalLM, torch.Tensor, object]:
    torch.manual_seed(0)
    model = DSVForCausalLM(presets.tiny()).train()
    ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(1))
    labels = ids.roll(-1, 1)
    labels[:, -1] = IGNORE_INDEX
    labels[1, :5] = IGNORE_INDEX  # e.g. SFT: no loss on the prompt
    out = model(ids, use_sparse=False, indexer_loss=True, return_mtp=True)
    return model, labels, out


def test_lm_terms_equal_the_inline_training_loss(forward: tuple) -> None:
    """What train() summed inline before the terms had names, written out for a 2-process step."""
    model, labels, o = forward
    assert o.mtp_logits and o.aux_loss is not None and o.indexer_loss is not None
    world, n_targets, share = 2, 3 * int((labels != IGNORE_INDEX).sum()), 2 / 8 * 2
    mtp_w, alpha, idx_w = 0.3, 1e-2, 0.7
    lm = F.cross_entropy(o.logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    inline = lm / n_targets * world
    mtp_sum = torch.zeros(())
    for d, ml in enumerate(o.mtp_logits):
        mt = F.cross_entropy(
            ml.flatten(0, 1), labels[:, 1 + d :].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        inline = inline + mtp_w * mt / n_targets * world / len(o.mtp_logits)
        mtp_sum = mtp_sum + mt.detach() / len(o.mtp_logits)
    inline = inline + alpha * o.aux_loss * share + idx_w * o.indexer_loss * share

    terms = lm_terms(o, labels, token_scale=world / n_targets, batch_scale=share,
                     mtp_weight=mtp_w, aux_weight=alpha, indexer_weight=idx_w)  # fmt: skip
    assert list(terms) == ["lm", "mtp", "aux", "indexer"]
    assert [terms.weight(n) for n in terms] == [1.0, mtp_w, alpha, idx_w]
    torch.testing.assert_close(terms.total(), inline, rtol=1e-6, atol=0)
    params = [p for p in model.parameters() if p.requires_grad]
    g_terms = torch.autograd.grad(terms.total(), params, retain_graph=True, allow_unused=True)
    g_inline = torch.autograd.grad(inline, params, allow_unused=True)
    for a, b in zip(g_terms, g_inline, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    # the logged values: summed over processes / world gives what train() logged before
    logged = terms.stacked(["lm", "mtp", "aux", "indexer"]) / world
    expected = [lm.item() / n_targets, mtp_sum.item() / n_targets, o.aux_loss.item() * share / world,
                o.indexer_loss.item() * share / world]  # fmt: skip
    torch.testing.assert_close(logged, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)


def test_lm_terms_defaults_and_the_warmup(forward: tuple) -> None:
    _, labels, o = forward
    # defaults: each term is this batch's own mean; no weight, no MTP or balance term
    terms = lm_terms(o, labels)
    assert list(terms) == ["lm", "indexer"]
    mean_ce = F.cross_entropy(o.logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(terms["lm"], mean_ce)
    torch.testing.assert_close(terms["indexer"], o.indexer_loss)
    # the DSA warm-up trains the indexers alone
    warm = lm_terms(o, labels, lm=False, mtp_weight=0.3, aux_weight=1e-2)
    assert list(warm) == ["indexer"]
