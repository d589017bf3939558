"""What ``generate`` records for a training forward to replay: penalties, which that forward does
not apply, are refused together with the kept masks; the recorded logprobs replay exactly.

Run: ``pytest packages/core/tests/test_core_generate_replay.py``.
"""

from __future__ import annotations

import pytest
import torch

from dsv.core.generate import SamplingParams, generate, scaled_logits
from dsv.core.model import DSVForCausalLM
from dsv.core.presets import tiny


@pytest.mark.parametrize("penalty", ["presence_penalty", "frequency_penalty"])
def test_masks_with_penalties_are_refused(penalty: str) -> None:
    model = DSVForCausalLM(tiny()).eval()
    params = SamplingParams(max_new_tokens=4, seed=1, top_p=0.9, **{penalty: 0.5})
    with pytest.raises(ValueError, match="presence_penalty and frequency_penalty"):
        generate(model, [0, 5], params, return_sampling_masks=True)
    assert len(generate(model, [0, 5], params).tokens) == 4  # without masks, penalties still apply


def test_recorded_masks_and_logprobs_replay_in_a_training_forward() -> None:
    torch.manual_seed(0)
    model = DSVForCausalLM(tiny()).eval()
    prompt = [0, 7, 8, 9]
    params = SamplingParams(max_new_tokens=6, seed=3, temperature=0.8, top_p=0.9, top_k=50)
    out = generate(model, prompt, params, return_sampling_masks=True)
    assert out.sampling_masks is not None
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.tokens])).logits[0, len(prompt) - 1 : -1]
    masks = torch.stack(out.sampling_masks)
    replay = scaled_logits(logits, params.temperature).masked_fill(~masks, float("-inf")).log_softmax(-1)
    got = replay.gather(1, torch.tensor(out.tokens)[:, None]).squeeze(1)
    torch.testing.assert_close(got, torch.tensor(out.logprobs), atol=1e-4, rtol=1e-4)
