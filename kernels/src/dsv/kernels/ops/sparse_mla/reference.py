"""Torch references for sparse MLA: the batched op (core's ``sparse_mla_reference``) and the varlen /
paged layout used for serving, where ragged sequences share one flat latent cache and ``idx`` holds
flat cache rows.
"""

from __future__ import annotations

import torch

from dsv.core.attention import sparse_mla_reference

__all__ = [
    "flat_indices_cu_seqlens",
    "flat_indices_paged",
    "sparse_mla_reference",
    "sparse_mla_varlen_reference",
]


def sparse_mla_varlen_reference(
    q: torch.Tensor, kv_flat: torch.Tensor, idx: torch.Tensor, sm_scale: float, d_v: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [N, H, D]`` tokens of any number of sequences, ``kv_flat [P, D]`` the flat (or paged) latent
    cache, ``idx [N, K]`` flat rows of ``kv_flat`` (``-1`` = none) -> ``(out [N, H, d_v], lse [N, H])``."""
    out, lse = sparse_mla_reference(q.unsqueeze(0), kv_flat.unsqueeze(0), idx.unsqueeze(0), sm_scale, d_v)
    return out.squeeze(0), lse.squeeze(0)


def flat_indices_cu_seqlens(
    idx: torch.Tensor, seq_ids: torch.Tensor, cu_seqlens: torch.Tensor
) -> torch.Tensor:
    """Positions within each token's own sequence -> rows of the packed cache ``kv[cu_seqlens[i]:cu_seqlens[i+1]]``.

    ``idx [N, K]`` (``-1`` kept), ``seq_ids [N]`` the sequence of each token, ``cu_seqlens [num_seqs + 1]``.
    """
    flat = idx.long() + cu_seqlens.long()[seq_ids.long()].unsqueeze(-1)
    return torch.where(idx >= 0, flat, -1).to(torch.int32)


def flat_indices_paged(
    idx: torch.Tensor, seq_ids: torch.Tensor, block_table: torch.Tensor, page_size: int
) -> torch.Tensor:
    """Positions within each token's sequence -> rows of a paged cache ``[num_pages * page_size, D]``:
    ``block_table[seq, pos // page_size] * page_size + pos % page_size`` (``-1`` kept)."""
    pos = idx.long().clamp_min(0)
    pages = block_table.long()[seq_ids.long().unsqueeze(-1), pos // page_size]
    return torch.where(idx >= 0, pages * page_size + pos % page_size, -1).to(torch.int32)
