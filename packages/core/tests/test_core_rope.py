"""``dsv.core.model.rope.Rotary``: the two RoPE layouts against their formulas written out.

The model-level parity with transformers (test_core_parity.py) checks the rotations end to end;
these pin the pieces: bit-for-bit equality with the textbook forms, the pass-through dims of the
indexer's partial rotation, the per-forward tables, and that a table first built under inference
mode still serves a training forward.
"""

from __future__ import annotations

import pytest
import torch

from dsv.core.model.rope import Rotary


def _angles(B: int, S: int, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(B * S).view(B, S) * 7 + 3
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 2 * half, 2, dtype=torch.float32) / (2 * half)))
    angles = positions.float().unsqueeze(-1) * inv_freq
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("heads", [None, 3])
def test_half_split_is_the_two_halves_rotated_apart(heads: int | None) -> None:
    B, S, rot, d = 2, 5, 4, 16  # 8 rotated dims, 8 passed through (the indexer's layout)
    cos, sin = _angles(B, S, rot)
    x = torch.randn(B, S, d) if heads is None else torch.randn(B, S, heads, d)
    got = Rotary(cos, sin).half(x, 2 * rot)
    c, s = (cos, sin) if heads is None else (cos.unsqueeze(2), sin.unsqueeze(2))
    x1, x2, rest = x[..., :rot], x[..., rot : 2 * rot], x[..., 2 * rot :]
    want = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, rest), dim=-1)
    assert torch.equal(got, want)


def test_interleaved_is_the_complex_product_per_pair() -> None:
    B, S, H, rot = 2, 3, 4, 4
    cos, sin = _angles(B, S, rot)
    x = torch.randn(B, S, H, 2 * rot)
    got = Rotary(cos, sin).interleaved(x)
    even, odd = x[..., 0::2], x[..., 1::2]
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    want = torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # a 3-D input (the cached k_pe) and a non-contiguous view rotate the same way
    k = torch.randn(B, S, 3 * rot)[..., rot:]
    torch.testing.assert_close(Rotary(cos, sin).interleaved(k), Rotary(cos, sin).interleaved(k.contiguous()))


def test_tables_are_built_once_per_forward_and_head_slices_positions() -> None:
    cos, sin = _angles(2, 6, 4)
    rope = Rotary(cos, sin)
    x = torch.randn(2, 6, 3, 8)
    rope.half(x)
    rope.half(x)
    rope.interleaved(x)
    assert sorted(k[0] for k in rope._forms) == ["half-cos", "half-cos", "half-sin", "half-sin", "interleaved", "interleaved"]
    first = rope.head(4)
    assert torch.equal(first.half(x[:, :4]), rope.half(x)[:, :4])
    with pytest.raises(ValueError, match="needs 5 angles, got 4"):
        rope.half(x, 10)


def test_a_table_built_under_inference_mode_serves_a_training_forward() -> None:
    cos, sin = _angles(1, 4, 4)
    with torch.inference_mode():
        Rotary(cos, sin).half(torch.randn(1, 4, 16))  # the permutation is cached from here
    x = torch.randn(1, 4, 16, requires_grad=True)
    Rotary(cos, sin).half(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
