"""Sampling: the kept-token masks (Keep Sampling Mask), greedy, seeds, stop tokens, streaming,
presence/frequency penalties."""

from __future__ import annotations

import pytest
import torch

from dsv.core.generate import (
    SamplingParams,
    apply_logit_bias,
    apply_penalties,
    generate,
    kept_token_mask,
    sample_next,
)
from dsv.core.model import DSVForCausalLM
from dsv.core.presets import tiny


def test_top_k_and_top_p_masks() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert kept_token_mask(logits, SamplingParams(top_k=2)).tolist() == [[True, True, False, False, False]]
    assert kept_token_mask(logits, SamplingParams(top_p=0.7)).tolist() == [[True, True, False, False, False]]
    assert kept_token_mask(logits, SamplingParams(top_p=0.71)).tolist() == [[True, True, True, False, False]]
    assert kept_token_mask(logits, SamplingParams(top_p=0.1)).tolist() == [[True, False, False, False, False]]
    assert kept_token_mask(logits, SamplingParams(temperature=0)).tolist() == [
        [True, False, False, False, False]
    ]


def test_samples_stay_in_kept_set_and_logprobs_are_renormalised() -> None:
    logits = torch.randn(64, 50)
    params = SamplingParams(top_k=5, top_p=0.8, temperature=0.7)
    res = sample_next(logits, params, torch.Generator().manual_seed(0))
    assert res.kept_mask.gather(1, res.tokens[:, None]).all()
    logp = (logits / 0.7).masked_fill(~res.kept_mask, float("-inf")).log_softmax(-1)
    torch.testing.assert_close(res.logprobs, logp.gather(1, res.tokens[:, None]).squeeze(1))


def test_invalid_params_are_rejected() -> None:
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"presence_penalty": 2.5},
                {"frequency_penalty": -3}):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


def test_generate_is_seeded_and_streams() -> None:
    model = DSVForCausalLM(tiny()).eval()
    params = SamplingParams(max_new_tokens=12, seed=7, top_p=0.9)
    seen: list[int] = []
    a = generate(model, [0, 5, 9], params, return_sampling_masks=True, on_token=seen.append)
    b = generate(model, [0, 5, 9], params)
    assert a.tokens == b.tokens == seen and len(a.tokens) == 12 and a.finish_reason == "length"
    assert a.sampling_masks is not None and len(a.sampling_masks) == 12
    assert all(m[t] for m, t in zip(a.sampling_masks, a.tokens, strict=True))


def test_greedy_generate_equals_argmax_of_full_forward_and_stops() -> None:
    model = DSVForCausalLM(tiny(index_topk=4)).eval()
    prompt = [0, 11, 12, 13, 14, 15]
    out = generate(model, prompt, SamplingParams(temperature=0, max_new_tokens=8))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert out.tokens == seq[len(prompt) :]
    stop = generate(
        model, prompt, SamplingParams(temperature=0, max_new_tokens=8, stop_token_ids=(out.tokens[2],))
    )
    assert stop.tokens == out.tokens[: out.tokens.index(out.tokens[2]) + 1] and stop.finish_reason == "stop"


def test_keep_routing_from_generate() -> None:
    model = DSVForCausalLM(tiny()).eval()
    out = generate(model, [0, 3, 4], SamplingParams(max_new_tokens=3, seed=1), return_routes=True)
    assert out.routes is not None and len(out.routes) == 3
    assert out.routes[0][1].shape == (1, 3, 2) and out.routes[1][1].shape == (1, 1, 2)


def test_penalties_lower_the_logits_of_generated_tokens() -> None:
    logits = torch.zeros(1, 6)
    out = apply_penalties(logits, {1: 1, 4: 3}, presence=0.5, frequency=0.25)
    assert out.tolist() == [[0.0, -0.75, 0.0, 0.0, -1.25, 0.0]]
    assert logits.abs().sum() == 0, "the input is left as it was"
    assert apply_penalties(logits, {}, 1.0, 1.0) is logits
    assert apply_penalties(logits, {2: 1}, 0.0, 0.0) is logits
    favoured = apply_penalties(logits, {2: 2}, presence=-1.0, frequency=-0.5)
    assert favoured[0, 2] == 2.0
    # Each penalty also applies alone.
    assert apply_penalties(logits, {1: 1, 4: 3}, 0.5, 0.0).tolist() == [[0.0, -0.5, 0.0, 0.0, -0.5, 0.0]]
    assert apply_penalties(logits, {1: 1, 4: 3}, 0.0, 0.25).tolist() == [[0.0, -0.25, 0.0, 0.0, -0.75, 0.0]]


def test_scaled_logits_shift_each_position_over_the_vocabulary_and_top_k_1_keeps_the_argmax() -> None:
    from dsv.core.generate import scaled_logits

    # [B, T, V] as RL's training forward passes them: the shift is per position, over the vocabulary.
    x = torch.randn(2, 3, 7, generator=torch.Generator().manual_seed(0)) * 3
    out = scaled_logits(x, 0.5)
    assert (out.amax(-1) == 0).all()
    torch.testing.assert_close(out.softmax(-1), (x / 0.5).softmax(-1))
    keep = kept_token_mask(x[0], SamplingParams(temperature=1.0, top_k=1))
    assert keep.sum(-1).tolist() == [1, 1, 1] and keep[torch.arange(3), x[0].argmax(-1)].all()


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_sample_next_draws_from_the_tempered_distribution(temperature: float) -> None:
    """20,000 seeded draws: token frequencies within 0.02 of ``softmax(logits / T)``, and each
    draw's logprob is that distribution's."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]])
    want = (logits[0] / temperature).softmax(-1)
    g = torch.Generator().manual_seed(0)
    res = sample_next(logits.expand(20_000, -1), SamplingParams(temperature=temperature), g)
    freq = torch.bincount(res.tokens, minlength=5).float() / 20_000
    assert (freq - want).abs().max() < 0.02, (freq, want)
    torch.testing.assert_close(res.logprobs, want.log()[res.tokens], atol=1e-5, rtol=0)


def test_greedy_generate_with_penalties_equals_the_penalised_argmax() -> None:
    torch.manual_seed(0)
    model = DSVForCausalLM(tiny()).eval()
    prompt = [0, 5, 9, 11]
    plain = generate(model, prompt, SamplingParams(temperature=0, max_new_tokens=30))
    assert len(set(plain.tokens)) < len(plain.tokens), "this model repeats itself when not penalised"
    params = SamplingParams(temperature=0, max_new_tokens=30, presence_penalty=0.4, frequency_penalty=0.3)
    out = generate(model, prompt, params)
    # Reference: the full forward's last logits, each generated token's logit lowered by hand.
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(30):
            logits = model(torch.tensor([seq])).logits[0, -1].clone()
            gen = seq[len(prompt) :]
            for tok in set(gen):
                logits[tok] -= 0.3 * gen.count(tok) + 0.4
            seq.append(int(logits.argmax()))
    assert out.tokens == seq[len(prompt) :]
    assert out.tokens != plain.tokens


def test_logit_bias_adds_to_the_named_tokens() -> None:
    logits = torch.zeros(2, 5)
    out = apply_logit_bias(logits, {0: -100.0, 3: 2.5})
    assert out.tolist() == [[-100.0, 0.0, 0.0, 2.5, 0.0]] * 2
    assert logits.abs().sum() == 0 and apply_logit_bias(logits, {}) is logits


@pytest.mark.parametrize("temperature", [1e-9, 1e-30, 1e-45, 1e-300])
def test_tiny_temperatures_sample_the_argmax_instead_of_failing(temperature: float) -> None:
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)) * 3
    logits[2, 7] = logits[2, 9] = logits[2].max() + 1  # a tie: either top token may be drawn
    res = sample_next(logits, SamplingParams(temperature=temperature), torch.Generator().manual_seed(1))
    assert res.tokens[:2].tolist() == logits[:2].argmax(-1).tolist()
    assert int(res.tokens[2]) in (7, 9)
    assert torch.isfinite(res.logprobs).all() and (res.logprobs <= 0).all()
    assert res.logprobs[:2].tolist() == [0.0, 0.0]
