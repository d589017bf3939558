"""The GRPO objective of :mod:`dsv.rl.objective` against values worked out by hand.

Every expected number below was computed on paper (or with a calculator from the formula in the
comment beside it), not by the code under test. The KL estimators are also checked on sampled
data: tokens drawn from a known π_old ≠ π_θ, where the ratio-corrected estimator's mean (and
gradient) match KL(π_θ‖π_ref) and plain k3's do not.

Run: ``pytest packages/rl/tests/test_rl_objective.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from dsv.core.generate import SamplingParams, sample_next
from dsv.rl.objective import (
    KeptSets,
    group_advantages,
    grpo_loss,
    kl_k3,
    kl_unbiased,
    off_policy_mask,
    sampling_logprobs,
)

LN = math.log
INF = float("inf")


def _t(x: object) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# ---------------------------------------------------------------------------------- advantages


def test_advantages_for_every_scaling() -> None:
    rewards = torch.tensor([1.0, 0.0, 3.0, 1.0])  # groups (1, 0) and (3, 1): means 0.5 and 2
    none = group_advantages(rewards, 2)
    assert none.tolist() == [0.5, -0.5, 1.0, -1.0]  # R - mean, no std division (the default)
    # group std (unbiased): sqrt(0.5) and sqrt(2) -> +-0.5/0.70711 and +-1/1.41421
    group = group_advantages(rewards, 2, scale="group", eps=0.0)
    torch.testing.assert_close(group, torch.tensor([0.7071068, -0.7071068, 0.7071068, -0.7071068]))
    # batch std of (1, 0, 3, 1): mean 1.25, squares 4.75 / 3 -> std 1.2583057
    batch = group_advantages(rewards, 2, scale="batch", eps=0.0)
    torch.testing.assert_close(batch, torch.tensor([0.3973597, -0.3973597, 0.7947194, -0.7947194]))
    # a group of equal rewards has no signal: 0, not nan, even when divided by its (zero) std
    flat = group_advantages(torch.tensor([0.0, 1.0, 2.0, 5.0, 5.0, 5.0]), 3, scale="group")
    torch.testing.assert_close(flat, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize(
    ("rewards", "g", "scale", "message"),
    [
        ([1.0, 2.0], 1, "none", "group_size must be >= 2"),
        ([1.0, 2.0, 3.0], 2, "none", "multiple of group_size"),
        ([[1.0, 2.0]], 2, "none", "shape \\[B\\]"),
        ([1.0, 2.0], 2, "std", "scale must be"),
    ],
    ids=["group-of-one", "ragged", "2d", "bad-scale"],
)
def test_advantages_refuse_bad_input(rewards: list, g: int, scale: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        group_advantages(torch.tensor(rewards), g, scale=scale)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- clipped loss

# Two sequences, old π = 0.5 everywhere, ratios chosen per token (the third of row 1 is padding):
#   row 0, Â = +1: r = 1.0, 1.5, 0.5  -> -min(rÂ, clip(r)Â) = -1, -1.2 (upper clip binds), -0.5
#   row 1, Â = -1: r = 1.1, 0.5, pad -> 1.1, 0.8 (lower clip binds)
# per-row sums -2.7 (3 tokens) and 1.9 (2 tokens).
RATIOS = [[1.0, 1.5, 0.5], [1.1, 0.5, 1.0]]
MASK = [[1, 1, 1], [1, 1, 0]]
ADV = [1.0, -1.0]


def _batch(ratios: list[list[float]] = RATIOS) -> tuple[torch.Tensor, torch.Tensor]:
    old = torch.full((2, 3), LN(0.5), dtype=torch.float64)
    logp = (old + _t(ratios).log()).requires_grad_(True)
    return logp, old


@pytest.mark.parametrize(
    ("aggregation", "max_len", "expected"),
    [
        ("grpo", None, (-2.7 / 3 + 1.9 / 2) / 2),  # mean over rows of row means: 0.025
        ("dapo", None, (-2.7 + 1.9) / 5),  # over all 5 tokens: -0.16
        ("dr_grpo", None, (-2.7 + 1.9) / (2 * 3)),  # B * T: -0.1333
        ("dr_grpo", 4, (-2.7 + 1.9) / (2 * 4)),  # B * max_len: -0.1
    ],
    ids=["grpo", "dapo", "dr_grpo-T", "dr_grpo-max_len4"],
)
def test_clipped_loss_for_each_aggregation(aggregation: str, max_len: int | None, expected: float) -> None:
    logp, old = _batch()
    terms = grpo_loss(logp, old, _t(ADV), torch.tensor(MASK).bool(), aggregation=aggregation, max_len=max_len)  # type: ignore[arg-type]
    assert list(terms) == ["pg"]  # no reference given: no KL term
    assert terms["pg"].item() == pytest.approx(expected, abs=1e-12)
    stats = terms.metrics()
    assert stats["clip_frac_low"] == pytest.approx(1 / 5)  # row 1, token 1
    assert stats["clip_frac_high"] == pytest.approx(1 / 5)  # row 0, token 1
    assert stats["ratio_mean"] == pytest.approx((1.0 + 1.5 + 0.5 + 1.1 + 0.5) / 5)
    # mean of r - 1 - ln r over the five tokens
    assert stats["approx_kl_old"] == pytest.approx(0.0971038146, abs=1e-9)
    assert stats["opsm_masked_frac"] == 0.0


def test_clipped_tokens_get_no_gradient_and_the_others_do() -> None:
    logp, old = _batch()
    grpo_loss(logp, old, _t(ADV), _t(MASK), aggregation="dapo").total().backward()
    # d/dlogp of -r Â / 5 is -Â r / 5 where the clip does not bind, 0 where it does or on padding
    expected = [[-1.0 / 5, 0.0, -0.5 / 5], [1.1 / 5, 0.0, 0.0]]
    torch.testing.assert_close(logp.grad, _t(expected))


def test_dapo_asymmetric_clip() -> None:
    logp, old = _batch()
    terms = grpo_loss(logp, old, _t(ADV), _t(MASK), aggregation="dapo", eps_low=0.2, eps_high=0.28)
    # row 0 token 1 now clips at 1.28 instead of 1.2: (-1 - 1.28 - 0.5 + 1.1 + 0.8) / 5
    assert terms["pg"].item() == pytest.approx(-0.176, abs=1e-12)
    # a ratio of 1.25 is clipped by the symmetric range but not by DAPO's raised upper bound
    logp, old = _batch([[1.25, 1.0, 1.0], [1.0, 1.0, 1.0]])
    sym = grpo_loss(logp, old, _t(ADV), _t(MASK), aggregation="dapo")
    asym = grpo_loss(logp, old, _t(ADV), _t(MASK), aggregation="dapo", eps_high=0.28)
    assert sym["pg"].item() == pytest.approx((-1.2 - 1 - 1 + 1 + 1) / 5, abs=1e-12)
    assert asym["pg"].item() == pytest.approx((-1.25 - 1 - 1 + 1 + 1) / 5, abs=1e-12)
    assert sym.metrics()["clip_frac_high"] == pytest.approx(0.2) and asym.metrics()["clip_frac_high"] == 0.0


def test_unclipped_side_is_never_clipped() -> None:
    # Â > 0 with r far below 1 - eps and Â < 0 with r far above 1 + eps keep r Â (and its gradient):
    # the clip only removes the incentive to move further in the advantage's direction.
    logp, old = _batch([[0.5, 1.0, 1.0], [1.5, 1.0, 1.0]])
    terms = grpo_loss(logp, old, _t(ADV), _t(MASK), aggregation="dapo")
    assert terms["pg"].item() == pytest.approx((-0.5 - 1 - 1 + 1.5 + 1) / 5, abs=1e-12)
    terms.total().backward()
    assert logp.grad is not None
    assert logp.grad[0, 0].item() == pytest.approx(-0.5 / 5) and logp.grad[1, 0].item() == pytest.approx(
        1.5 / 5
    )
    assert terms.metrics()["clip_frac_low"] == 0.0 and terms.metrics()["clip_frac_high"] == 0.0


def test_gspo_sequence_level() -> None:
    logp, old = _batch()
    terms = grpo_loss(logp, old, _t(ADV), _t(MASK), level="sequence")
    # s_0 = (1 * 1.5 * 0.5)^(1/3) = 0.9085603, Â = +1 -> -0.9085603 (inside the clip range)
    # s_1 = (1.1 * 0.5)^(1/2) = 0.7416198, Â = -1 -> clipped at 0.8 -> +0.8
    assert terms["pg"].item() == pytest.approx((-0.9085602964 + 0.8) / 2, abs=1e-9)
    terms.total().backward()
    # row 0: d(-s_0)/dlogp_t = -s_0 / 3 per token, / 2 rows; row 1 is clipped: no gradient
    torch.testing.assert_close(logp.grad, _t([[-0.1514267161] * 3, [0.0, 0.0, 0.0]]), rtol=0, atol=1e-9)
    dapo = grpo_loss(*_batch(), _t(ADV), _t(MASK), level="sequence", aggregation="dapo")
    assert dapo["pg"].item() == pytest.approx((3 * -0.9085602964 + 2 * 0.8) / 5, abs=1e-9)


def test_padding_may_hold_minus_inf_without_nan() -> None:
    logp, old = _batch()
    padded_logp = torch.where(_t(MASK).bool(), logp, -INF)
    old = torch.where(_t(MASK).bool(), old, -INF)
    terms = grpo_loss(padded_logp, old, _t(ADV), _t(MASK), ref_logp=old.clone(), beta=0.1)
    terms.total().backward()
    assert torch.isfinite(terms.total()) and logp.grad is not None and torch.isfinite(logp.grad).all()
    assert terms["pg"].item() == pytest.approx(0.025, abs=1e-12)


def test_inputs_that_must_not_train_get_no_gradient() -> None:
    logp, old = _batch()
    old = old.clone().requires_grad_(True)
    ref = old.detach().clone().requires_grad_(True)
    adv = _t(ADV).requires_grad_(True)
    grpo_loss(logp, old, adv, _t(MASK), ref_logp=ref, beta=0.5).total().backward()
    assert logp.grad is not None and logp.grad.abs().sum() > 0
    assert old.grad is None and ref.grad is None and adv.grad is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 0.1}, "needs ref_logp"),
        ({"aggregation": "mean"}, "aggregation must be"),
        ({"level": "seq"}, "level must be"),
        ({"kl": "k2"}, "kl must be"),
        ({"eps_low": 1.0}, "clip range"),
        ({"max_len": 0}, "max_len"),
        ({"tis_cap": 0.0}, "tis_cap"),
    ],
    ids=["beta-without-ref", "aggregation", "level", "kl", "eps", "max_len", "tis_cap"],
)
def test_grpo_loss_refuses_bad_settings(kwargs: dict, message: str) -> None:
    logp, old = _batch()
    with pytest.raises(ValueError, match=message):
        grpo_loss(logp, old, _t(ADV), _t(MASK), **kwargs)


def test_grpo_loss_refuses_mismatched_shapes() -> None:
    logp, old = _batch()
    with pytest.raises(ValueError, match="old_logp must have logp's shape"):
        grpo_loss(logp, old[:, :2], _t(ADV), _t(MASK))
    with pytest.raises(ValueError, match="advantages must be one value per sequence"):
        grpo_loss(logp, old, _t([1.0, 2.0, 3.0]), _t(MASK))
    with pytest.raises(ValueError, match="beta must be a float or one value per sequence"):
        grpo_loss(logp, old, _t(ADV), _t(MASK), ref_logp=old, beta=_t([0.1, 0.1, 0.1]))


# ---------------------------------------------------------------------------------- KL estimators


def test_kl_estimators_by_hand() -> None:
    # π_θ = 0.5, π_ref = 0.25, π_old = 0.4: k3 = 0.5 - ln 0.5 - 1 = 0.1931472, ratio 1.25 -> 0.2414340
    # π_θ = 0.2, π_ref = 0.6: k3 = 3 - ln 3 - 1 = 0.9013877
    logp = _t([LN(0.5), LN(0.2)]).requires_grad_(True)
    ref = _t([LN(0.25), LN(0.6)])
    old = _t([LN(0.4), LN(0.2)])
    torch.testing.assert_close(kl_k3(logp, ref), _t([0.1931471806, 0.9013877113]), rtol=0, atol=1e-9)
    unbiased = kl_unbiased(logp, ref, old)
    torch.testing.assert_close(unbiased, _t([0.2414339757, 0.9013877113]), rtol=0, atol=1e-9)
    # gradients: d k3/dlogp = 1 - π_ref/π_θ; d (r k3)/dlogp = r (k3 + 1 - π_ref/π_θ)
    (k3_grad,) = torch.autograd.grad(kl_k3(logp, ref).sum(), logp)
    torch.testing.assert_close(k3_grad, _t([0.5, -2.0]))
    (unbiased_grad,) = torch.autograd.grad(unbiased.sum(), logp)
    torch.testing.assert_close(unbiased_grad, _t([1.25 * (0.1931471806 + 0.5), 0.9013877113 - 2.0]))


def test_kl_term_per_family_beta_and_never_masked() -> None:
    logp = _t([[LN(0.5)], [LN(0.2)]]).requires_grad_(True)
    ref, old = _t([[LN(0.25)], [LN(0.6)]]), _t([[LN(0.4)], [LN(0.2)]])
    mask, adv = _t([[1], [1]]), _t([1.0, -1.0])
    # scalar β: 0.1 * mean(0.2414340, 0.9013877)
    terms = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1)
    assert terms["kl"].item() == pytest.approx(0.0571410844, abs=1e-9)
    assert terms.metrics()["kl_ref"] == pytest.approx(0.5714108436, abs=1e-9)
    # plain k3: 0.1 * mean(0.1931472, 0.9013877)
    k3 = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1, kl="k3")
    assert k3["kl"].item() == pytest.approx(0.1 * (0.1931471806 + 0.9013877113) / 2, abs=1e-9)
    # per-row β (a family without KL, e.g. math, and one with): only row 1 counts
    fam = grpo_loss(logp, old, adv, mask, ref_logp=ref, beta=_t([0.0, 1.0]))
    assert fam["kl"].item() == pytest.approx(0.9013877113 / 2, abs=1e-9)
    # OPSM masks row 1 (Â < 0, mean log(π_old/π_θ) = ln 0.2 - ln 0.2 + 1 > 0.5 after shifting π_old)
    far_old = old + _t([[0.0], [1.0]])
    masked = grpo_loss(logp, far_old, adv, mask, ref_logp=ref, beta=_t([0.0, 1.0]), opsm_delta=0.5)
    assert masked.metrics()["opsm_masked_frac"] == 0.5
    (g_pg,) = torch.autograd.grad(masked["pg"], logp, retain_graph=True)
    (g_kl,) = torch.autograd.grad(masked["kl"], logp)
    assert g_pg[1, 0].item() == 0.0  # the masked row gets no policy gradient...
    assert g_kl[1, 0].item() != 0.0  # ...but still its KL gradient


def _categorical_samples(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    theta = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    ref = torch.full((4,), 0.25, dtype=torch.float64)
    old = torch.tensor([0.5, 0.2, 0.2, 0.1], dtype=torch.float64)
    tokens = torch.multinomial(old, n, replacement=True, generator=torch.Generator().manual_seed(0))
    return theta, ref, old, tokens


def test_ratio_corrected_kl_is_unbiased_under_the_sampling_policy_and_k3_is_not() -> None:
    theta, ref, old, x = _categorical_samples(100_000)
    logp, ref_logp, old_logp = theta.log()[x], ref.log()[x], old.log()[x]
    # KL(π_θ‖π_ref) = Σ θ ln(θ / 0.25) = 0.1064402; E_old[k3] = Σ old (ref/θ - ln(ref/θ) - 1) = 0.3098570.
    # Per-token std: 0.101 (ratio-corrected), 0.275 (k3): standard errors 0.0003 and 0.0009.
    unbiased = kl_unbiased(logp, ref_logp, old_logp).mean().item()
    k3 = kl_k3(logp, ref_logp).mean().item()
    assert abs(unbiased - 0.1064402) < 0.005
    assert abs(k3 - 0.3098570) < 0.01  # plain k3 estimates its expectation under π_old...
    assert abs(k3 - 0.1064402) > 0.15  # ...which is not KL(π_θ‖π_ref)


def test_ratio_corrected_kl_gradient_is_the_true_kl_gradient() -> None:
    theta, ref, old, x = _categorical_samples(100_000)
    z = theta.log().clone().requires_grad_(True)  # π_θ = softmax(z)
    logp = z.log_softmax(-1)[x]
    (g_unbiased,) = torch.autograd.grad(kl_unbiased(logp, ref.log()[x], old.log()[x]).mean(), z)
    (g_k3,) = torch.autograd.grad(kl_k3(z.log_softmax(-1)[x], ref.log()[x]).mean(), z)
    # ∂KL(softmax(z)‖ref)/∂z_j = θ_j (ln(θ_j / ref_j) - KL)
    true = torch.tensor([-0.1022731, -0.0659167, 0.0227644, 0.1454254], dtype=torch.float64)
    torch.testing.assert_close(g_unbiased, true, rtol=0, atol=0.01)
    # plain k3 under π_old: E_old[(1 - ref/θ)(e_x - θ)] = (-0.677, 0.096, 0.252, 0.329): wrong sign on z_3
    torch.testing.assert_close(g_k3, torch.tensor([-0.6770833, 0.0958333, 0.2520833, 0.3291667], dtype=torch.float64),
                               rtol=0, atol=0.02)  # fmt: skip


# ---------------------------------------------------------------------------------- off-policy masking


def test_off_policy_mask_condition_and_delta_boundary() -> None:
    # mean over each row's tokens of old_logp - logp (padding, the third column of rows 1-2, ignored):
    #   row 0: Â = +2, gap 5       -> kept (positive advantages are never masked)
    #   row 1: Â = -1, gap 0.5 = δ -> kept (the condition is strictly > δ); 10 on padding ignored
    #   row 2: Â = -1, gap 0.5625  -> masked
    #   row 3: Â = -1, gap -3      -> kept (π_θ above π_old)
    #   row 4: Â = 0,  gap 5       -> kept (not negative)
    gaps = _t([[5.0, 5.0, 5.0], [0.25, 0.75, 10.0], [0.5, 0.625, 10.0], [-3.0, -3.0, -3.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1]]).bool()
    logp = torch.full((5, 3), -2.0, dtype=torch.float64)
    adv = _t([2.0, -1.0, -1.0, -1.0, 0.0])
    keep = off_policy_mask(adv, logp, logp + gaps, mask, delta=0.5)
    assert keep.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert off_policy_mask(adv, logp, logp + gaps, mask, delta=0.56).tolist() == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert off_policy_mask(adv, logp, logp + gaps, mask, delta=0.5625).tolist() == [1.0] * 5


def test_opsm_drops_exactly_the_masked_rows_policy_gradient() -> None:
    gaps = _t([[5.0, 5.0], [0.5, 0.625]])  # row 0 positive and far off-policy; row 1 negative, gap 0.5625
    logp = torch.full((2, 2), -1.0, dtype=torch.float64, requires_grad=True)
    old, mask, adv = logp.detach() + gaps, _t([[1, 1], [1, 1]]), _t([1.0, -1.0])
    full = grpo_loss(logp, old, adv, mask)
    masked = grpo_loss(logp, old, adv, mask, opsm_delta=0.5)
    # row 1: r = e^-0.5, e^-0.625 < 0.8 with Â = -1: both tokens clip to 0.8, a row mean of 0.8 / 2 rows
    assert full["pg"].item() - masked["pg"].item() == pytest.approx(0.4, abs=1e-12)
    assert masked.metrics()["opsm_masked_frac"] == 0.5
    # positive row 0 (r = e^-5) is kept and still trains, however far off-policy
    (grad,) = torch.autograd.grad(masked.total(), logp)
    assert grad[0].abs().min() > 0 and grad[1].abs().max() == 0


def test_opsm_and_truncated_importance_weights_use_the_engine_logprobs() -> None:
    logp = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 2, dtype=torch.float64)  # the trainer's recompute: on-policy, r = 1
    mask, adv = _t([[1, 1]]), _t([1.0])
    behaviour = _t([[-LN(1.5), -LN(3.0)]])  # the engine's: weights min(π_old/π_behaviour, cap) = 1.5, 2
    tis = grpo_loss(logp, old, adv, mask, aggregation="dapo", behaviour_logp=behaviour, tis_cap=2.0)
    assert tis["pg"].item() == pytest.approx(-(1.5 + 2.0) / 2, abs=1e-12)
    assert tis.metrics()["tis_weight_mean"] == pytest.approx(1.75)
    no_cap = grpo_loss(logp, old, adv, mask, aggregation="dapo", behaviour_logp=behaviour)
    assert no_cap["pg"].item() == pytest.approx(-1.0, abs=1e-12)
    # OPSM measures the gap to the engine's log-probs: a negative sequence the engine sampled at much
    # higher probability than π_θ gives is masked, though the trainer's recompute is on-policy
    far = _t([[3.0, 3.0]])
    assert grpo_loss(logp, old, _t([-1.0]), mask, opsm_delta=1.0).metrics()["opsm_masked_frac"] == 0.0
    masked = grpo_loss(logp, old, _t([-1.0]), mask, opsm_delta=1.0, behaviour_logp=far)
    assert masked.metrics()["opsm_masked_frac"] == 1.0 and masked["pg"].item() == 0.0


# ---------------------------------------------------------------------------------- Keep Sampling Mask


def test_sampling_logprobs_renormalise_over_the_kept_set() -> None:
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]]], requires_grad=True)
    keep = torch.tensor([[[True, True, False, False]]])
    tok = torch.tensor([[1]])
    # kept {0, 1}: p_1 = e^1 / (e^2 + e^1) = 0.2689414 -> ln = -1.3132617
    out = sampling_logprobs(logits, tok, 1.0, keep)
    assert out.logp.item() == pytest.approx(-1.3132617, abs=1e-6)
    # -(0.7310586 ln 0.7310586 + 0.2689414 ln 0.2689414)
    assert out.entropy is not None and out.entropy.item() == pytest.approx(0.5822031, abs=1e-6)
    # temperature 2: logits / 2 = (1, 0.5, ...): p_1 = 1 / (1 + e^0.5) -> ln = -0.9740770
    assert sampling_logprobs(logits, tok, 2.0, keep).logp.item() == pytest.approx(-0.9740770, abs=1e-6)
    # no mask: the full log-softmax, 1 - ln(e^2 + e + 1 + e^-1) = -1.4401897
    assert sampling_logprobs(logits, tok, 1.0).logp.item() == pytest.approx(-1.4401897, abs=1e-6)
    # the kept set carries all the mass; tokens outside it are impossible
    every = [sampling_logprobs(logits, torch.tensor([[v]]), 1.0, keep).logp.item() for v in range(4)]
    assert math.exp(every[0]) + math.exp(every[1]) == pytest.approx(1.0, abs=1e-6)
    assert every[2] == -INF and every[3] == -INF
    # gradient: (onehot - p) over the kept set, nothing outside it
    out.logp.sum().backward()
    assert logits.grad is not None
    torch.testing.assert_close(logits.grad, torch.tensor([[[-0.7310586, 0.7310586, 0.0, 0.0]]]))
    assert logits.detach().tolist() == [[[2.0, 1.0, 0.0, -1.0]]]  # the caller's logits are untouched


def test_sampling_logprobs_follow_sample_next() -> None:
    """The training-side log-probs equal the sampler's own, and the sampler never leaves the kept set."""
    V, n = 32, 4000
    row = torch.randn(V, generator=torch.Generator().manual_seed(3)) * 3
    params = SamplingParams(temperature=0.7, top_k=8, top_p=0.9)
    drawn = sample_next(row.expand(n, V), params, torch.Generator().manual_seed(4))
    assert drawn.kept_mask.gather(1, drawn.tokens[:, None]).all()  # never outside the kept set
    kept = int(drawn.kept_mask[0].sum())
    assert 1 < kept < 8 and len(drawn.tokens.unique()) == kept
    mine = sampling_logprobs(row.expand(1, n, V), drawn.tokens[None], 0.7, drawn.kept_mask[None])
    torch.testing.assert_close(mine.logp[0], drawn.logprobs)


def test_sparse_kept_sets_mask_like_the_dense_mask() -> None:
    """KeptSets (ids per position) give the values and gradients of the dense [B, T, V] mask."""
    # row 0: position 0 kept {1, 3}, position 1 every token (None), position 2 an empty set (every
    # token); row 1: position 0 kept {0}, then padding (the row is shorter than T)
    sets = [[torch.tensor([3, 1]), None, torch.tensor([], dtype=torch.long)], [torch.tensor([0])]]
    kept = KeptSets.from_ids(sets, 3)
    assert kept.shape == (2, 3) and kept.rows.tolist() == [0, 3]
    assert kept.pos.tolist() == [0, 0, 3] and kept.ids.tolist() == [3, 1, 0]
    dense = kept.dense(4)
    assert dense[0, 0].tolist() == [False, True, False, True] and dense[1, 0].tolist() == [
        True,
        False,
        False,
        False,
    ]
    assert dense[0, 1:].all() and dense[1, 1:].all()
    # by hand at row 0, position 0: logits (2, 1, 0, -1), kept {1, 3}: p_1 = e^1 / (e^1 + e^-1) -> ln = -0.1269280
    logits = torch.tensor([[[2.0, 1.0, 0.0, -1.0]] * 3, [[0.5, 0.0, 0.0, 0.0]] * 3], requires_grad=True)
    tokens = torch.tensor([[1, 2, 2], [0, 1, 1]])
    sparse = sampling_logprobs(logits, tokens, 1.0, kept)
    assert sparse.logp[0, 0].item() == pytest.approx(-0.1269280, abs=1e-6)
    assert sparse.logp[1, 0].item() == 0.0  # the only kept token: probability 1
    (g_sparse,) = torch.autograd.grad(sparse.logp.sum(), logits)
    full = sampling_logprobs(logits, tokens, 1.0, dense)
    (g_dense,) = torch.autograd.grad(full.logp.sum(), logits)
    torch.testing.assert_close(sparse.logp, full.logp, rtol=0, atol=0)
    assert sparse.entropy is not None and full.entropy is not None
    torch.testing.assert_close(sparse.entropy, full.entropy, rtol=0, atol=0)
    torch.testing.assert_close(g_sparse, g_dense, rtol=0, atol=0)
    assert g_sparse[0, 0, 0].item() == 0.0 and g_sparse[0, 0, 2].item() == 0.0  # outside the kept set
    assert logits.detach()[0, 0].tolist() == [2.0, 1.0, 0.0, -1.0]  # the caller's logits are untouched
    # a token outside its kept set could not have been sampled
    assert (
        sampling_logprobs(logits, torch.tensor([[0, 2, 2], [0, 1, 1]]), 1.0, kept).logp[0, 0].item() == -INF
    )
    with pytest.raises(ValueError, match="keep covers positions"):
        sampling_logprobs(logits[:, :2], tokens[:, :2], 1.0, kept)
    with pytest.raises(ValueError, match="more than T=2"):
        KeptSets.from_ids(sets, 2)


def test_sparse_kept_sets_match_the_sampler_on_a_large_batch() -> None:
    """Top-k/top-p sets drawn by sample_next, as ids: the sampler's own log-probs come back."""
    B, T, V = 3, 20, 64
    logits = torch.randn(B, T, V, generator=torch.Generator().manual_seed(5)) * 2
    params = SamplingParams(temperature=0.9, top_k=12, top_p=0.8)
    drawn = sample_next(logits.view(-1, V), params, torch.Generator().manual_seed(6))
    ids = [[drawn.kept_mask[b * T + t].nonzero().squeeze(1) for t in range(T)] for b in range(B)]
    mine = sampling_logprobs(logits, drawn.tokens.view(B, T), 0.9, KeptSets.from_ids(ids, T))
    torch.testing.assert_close(mine.logp.flatten(), drawn.logprobs)
    dense = sampling_logprobs(logits, drawn.tokens.view(B, T), 0.9, drawn.kept_mask.view(B, T, V))
    torch.testing.assert_close(mine.logp, dense.logp, rtol=0, atol=0)


def test_sampling_logprobs_padding_and_bad_input() -> None:
    logits = torch.randn(1, 2, 5)
    keep = torch.zeros(1, 2, 5, dtype=torch.bool)
    keep[0, 0, :2] = True  # position 1 is padding: an empty kept set
    out = sampling_logprobs(logits, torch.tensor([[0, 4]]), 1.0, keep)
    assert torch.isfinite(out.logp).all()
    assert out.logp[0, 1].item() == pytest.approx(logits[0, 1].log_softmax(-1)[4].item(), abs=1e-6)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sampling_logprobs(logits, torch.tensor([[0, 4]]), 0.0)
    with pytest.raises(ValueError, match="keep must be a bool tensor"):
        sampling_logprobs(logits, torch.tensor([[0, 4]]), 1.0, keep.float())
    with pytest.raises(ValueError, match="tokens \\[B, T\\]"):
        sampling_logprobs(logits, torch.tensor([0, 4]), 1.0)


def test_sampling_logprobs_keep_one_vocabulary_sized_copy_for_backward() -> None:
    B, T, V = 2, 3, 50
    logits = torch.randn(B, T, V, requires_grad=True)
    keep = torch.rand(B, T, V, generator=torch.Generator().manual_seed(0)) < 0.5
    keep[..., 0] = True
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = sampling_logprobs(logits, torch.zeros(B, T, dtype=torch.long), 0.7, keep)
    big = {t.untyped_storage().data_ptr() for t in saved if t.is_floating_point() and t.numel() == B * T * V}
    assert len(big) == 1  # the scaled, masked copy: not the logits, not a second copy
    assert logits.untyped_storage().data_ptr() not in big
    out.logp.sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    # the same with the kept sets as ids: no [B, T, V] mask at all, still one copy
    sets = [[keep[b, t].nonzero().squeeze(1) for t in range(T)] for b in range(B)]
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sparse = sampling_logprobs(
            logits, torch.zeros(B, T, dtype=torch.long), 0.7, KeptSets.from_ids(sets, T)
        )
    big = {t.untyped_storage().data_ptr() for t in saved if t.numel() == B * T * V}
    assert len(big) == 1 and logits.untyped_storage().data_ptr() not in big
    torch.testing.assert_close(sparse.logp, out.logp, rtol=0, atol=0)
