"""The lightning indexer of DeepSeek Sparse Attention (spec §2).

Per layer: its own query projection from MLA's q latent (``wq_b``: q_lora_rank -> H_I x D_I), one
key shared by all index heads (``wk`` + LayerNorm), and per-head weights (``weights_proj``, kept in
fp32 as in the reference's HF revision). The first ``qk_rope_head_dim`` dims of q and k carry
half-split RoPE ("rope part first", the fixed layout).

Scores: ``I[t,s] = sum_h w[t,h] / sqrt(H_I * D_I) * relu(q[t,h] . k[s])``; the two scales are folded
into ``w`` so the dispatch op computes the plain ``sum_h w * relu(q . k)``.

Not reproduced here: the reference rotates q/k with a Hadamard transform and quantises them to
FP8 before scoring. The rotation is orthonormal (scores are unchanged in exact arithmetic) and FP8
is a speed/precision trade-off; the FP8 scoring path lives in dsv.kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv.core.config import ModelConfig
from dsv.core.model.rope import Rotary


class Indexer(nn.Module):
    """Lightning-indexer projections; scoring and selection go through :mod:`dsv.core.attention`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        assert config.q_lora_rank is not None
        self.n_heads = config.index_n_heads
        self.head_dim = config.index_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.wq_b = nn.Linear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.weights_proj = nn.Linear(config.hidden_size, self.n_heads, bias=False)

    def keys(self, x: torch.Tensor, rope: Rotary) -> torch.Tensor:
        """Index keys ``[B, S, D_I]`` of the new tokens (cached alongside the MLA latent)."""
        return rope.half(self.k_norm(self.wk(x)), self.rope_dim)

    def queries(self, x: torch.Tensor, qr: torch.Tensor, rope: Rotary) -> tuple[torch.Tensor, torch.Tensor]:
        """Index queries ``[B, S, H_I, D_I]`` and head weights ``[B, S, H_I]`` (fp32, scales folded in)."""
        B, S, _ = x.shape
        q = rope.half(self.wq_b(qr).view(B, S, self.n_heads, self.head_dim), self.rope_dim)
        w = nn.functional.linear(x.float(), self.weights_proj.weight.float())
        return q, w * (self.n_heads**-0.5 * self.head_dim**-0.5)
