"""Multi-head Latent Attention with DeepSeek Sparse Attention (spec §1.3, §2).

Per token: ``c_q = RMSNorm(W_qa x)`` (shared with the indexer), ``q = W_qb c_q`` split into
``q_nope``/``q_pe``; ``W_kva x`` gives the latent ``c_kv`` (RMSNorm'd) and one shared ``k_pe``.
Only ``[c_kv ‖ k_pe]`` (``kv_lora_rank + qk_rope_head_dim`` values) is cached.

Three ways to attend, all the same maths:

- **MHA mode** (dense prefill): expand ``c_kv`` with ``W_kvb`` into per-head ``k_nope``/``v`` and
  run SDPA. Cheapest when every key is used and the sequence is short.
- **Absorbed / MQA mode** (decode): fold ``W_kvb``'s key half into the query
  (``q_nope · W_UK`` -> a ``kv_lora_rank`` query) and its value half into the output, so all heads
  attend directly over the cached latent rows.
- **Sparse** (DSA): absorbed queries attend only to the ``index_topk`` rows the lightning indexer
  selected, through :func:`dsv.core.attention.sparse_mla` (Triton kernels when available). At
  inference on a CPU, scoring, selection and this attention are one compiled call per layer
  (:func:`dsv.core.attention.fused_sparse_attention`, dsv-kernels' CPU kernel).

Sparse attention is used when the indexer exists and some query sees more than ``index_topk`` keys;
below that the selection is every visible key, so dense is exact and cheaper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsv.core import attention
from dsv.core.cache import KVCache
from dsv.core.config import ModelConfig
from dsv.core.model.indexer import Indexer
from dsv.core.model.layers import RMSNorm
from dsv.core.model.rope import Rotary

# Queries up to this many per row use the absorbed form for dense attention with a cache.
_ABSORBED_MAX_QUERIES = 16


@dataclass
class AttentionExtras:
    """What a layer reports besides its output."""

    indices: torch.Tensor | None = None  # (B, S, K) int32 DSA selection, -1 = masked
    indexer_loss: torch.Tensor | None = None  # scalar KL distillation loss


class MLA(nn.Module):
    """One MLA layer, with the lightning indexer when the config is ``deepseek_v32``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        H = config.num_attention_heads
        self.n_heads = H
        self.nope = config.qk_nope_head_dim
        self.rope = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.rank = config.kv_lora_rank
        self.scale = config.softmax_scale
        if config.q_lora_rank is not None:
            self.q_a_proj = nn.Linear(config.hidden_size, config.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * config.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(config.hidden_size, H * config.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            config.hidden_size, self.rank + self.rope, bias=config.attention_bias
        )
        self.kv_a_layernorm = RMSNorm(self.rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, config.hidden_size, bias=config.attention_bias)
        self.indexer = Indexer(config) if config.has_indexer else None

    # ------------------------------------------------------------------ pieces

    def _w_kvb(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)
        return w[:, : self.nope], w[:, self.nope :]  # W_UK (H, nope, r), W_UV (H, v, r)

    # Per-head products as one bmm over heads ([H, B*S, .] @ [H, ., .]): the same as an einsum
    # without its per-call planning, about half the cost at decode sizes.
    def _absorbed_query(self, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        B, S, H, n = q_nope.shape
        w_uk, _ = self._w_kvb()
        q_lat = torch.bmm(q_nope.reshape(B * S, H, n).transpose(0, 1), w_uk)  # (H, B*S, r)
        q_lat = q_lat.transpose(0, 1).reshape(B, S, H, self.rank)
        return torch.cat((q_lat, q_pe), dim=-1)  # (B, S, H, r + rope)

    def _absorbed_output(self, out_lat: torch.Tensor) -> torch.Tensor:
        B, S, H, r = out_lat.shape
        _, w_uv = self._w_kvb()
        out = torch.bmm(out_lat.to(w_uv.dtype).reshape(B * S, H, r).transpose(0, 1), w_uv.transpose(1, 2))
        return out.transpose(0, 1).reshape(B, S, H, self.v_dim)  # (B, S, H, v)

    def _mha_dense(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        kv_all: torch.Tensor,
        q_offset: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, S = q_nope.shape[:2]
        T = kv_all.shape[1]
        c_kv, k_pe = kv_all[..., : self.rank], kv_all[..., self.rank :]
        kv = self.kv_b_proj(c_kv).view(B, T, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv[..., : self.nope], kv[..., self.nope :]
        k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(B, T, self.n_heads, self.rope)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        # The fused (flash) SDPA kernels need equal query/key and value head sizes; MLA's value
        # head is smaller, which would drop SDPA to its unfused maths path (about 3x slower on CPU).
        # Zero-padding v changes nothing in the output's first v_dim columns.
        pad = q.shape[-1] - self.v_dim
        if pad > 0:
            v = F.pad(v, (0, pad))
        if mask is None and S == T and bool((q_offset == 0).all()):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=self.scale
            )
        else:
            visible = attention.causal_key_mask(q_offset, S, T, B, q.device) if mask is None else mask
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=visible.unsqueeze(1),
                scale=self.scale,
            )
        return out.transpose(1, 2)[..., : self.v_dim]  # (B, S, H, v)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        x: torch.Tensor,
        rope: Rotary,
        q_offset: torch.Tensor,
        *,
        layer: int,
        cache: KVCache | None = None,
        use_sparse: bool = True,
        want_indices: bool = False,
        indexer_loss: bool = False,
    ) -> tuple[torch.Tensor, AttentionExtras]:
        """``x [B, S, d]`` at positions ``q_offset[b] + t`` -> ``[B, S, d]`` and the extras."""
        B, S, _ = x.shape
        H = self.n_heads
        if self.config.q_lora_rank is not None:
            qr = self.q_a_layernorm(self.q_a_proj(x))  # (B, S, q_lora_rank), reused by the indexer
            q = self.q_b_proj(qr)
        else:
            qr = None
            q = self.q_proj(x)
        q = q.view(B, S, H, self.nope + self.rope)
        q_nope, q_pe = q[..., : self.nope], rope.interleaved(q[..., self.nope :])
        kv = self.kv_a_proj_with_mqa(x)
        c_kv = self.kv_a_layernorm(kv[..., : self.rank])
        k_pe = rope.interleaved(kv[..., self.rank :])
        latent = torch.cat((c_kv, k_pe), dim=-1)  # (B, S, r + rope): what the cache stores

        # The indexer learns only from its distillation loss: its inputs are detached so neither
        # loss leaks through it into the backbone (V3.2-Exp, sparse training stage).
        idx_in = x.detach() if indexer_loss else x
        index_k = self.indexer.keys(idx_in, rope) if self.indexer is not None else None
        update_paged = getattr(cache, "update_paged", None)
        # A model without an indexer decodes this way too, with every visible key as its selection
        # (one row of indices per query: cheap at decode, a [S, T] block for a long prefill chunk).
        in_place = use_sparse or (self.indexer is None and S == 1)
        if update_paged is not None and in_place and not indexer_loss and attention.paged_sparse_ok(q):
            # A paged cache where the Triton kernels run: the indexer reads its keys and the sparse
            # kernel the selected latent rows in the block stores; nothing is gathered.
            rows = update_paged(layer, latent, index_k)
            T = rows.slots.shape[1]
            extras = AttentionExtras()
            if self.indexer is not None:
                assert qr is not None and rows.index_k is not None
                iq, iw = self.indexer.queries(x, qr, rope)
                scores = attention.indexer_scores_paged(iq, rows, iw, q_offset)
                idx = attention.select_topk(scores, self.config.index_topk)  # all visible keys when T <= k
                if want_indices or int(q_offset.max()) + S > self.config.index_topk:
                    extras.indices = idx
            else:  # dense attention as a selection of every visible key
                visible = attention.causal_key_mask(q_offset, S, T, B, x.device)  # (B, S, T)
                idx = torch.where(visible, torch.arange(T, device=x.device), -1)
            q_abs = self._absorbed_query(q_nope, q_pe)
            out_lat, _ = attention.sparse_mla_paged(q_abs, rows, idx, self.scale, self.rank)
            out = self._absorbed_output(out_lat)
            return self.o_proj(out.reshape(B, S, H * self.v_dim).to(x.dtype)), extras
        if cache is not None:
            kv_all, index_k_all = cache.update(layer, latent, index_k)
        else:
            kv_all, index_k_all = latent, index_k
        max_visible = int(q_offset.max()) + S

        extras = AttentionExtras()
        sparse = self.indexer is not None and use_sparse and max_visible > self.config.index_topk
        need_scores = self.indexer is not None and (sparse or want_indices or indexer_loss)
        scores = None
        if sparse and not indexer_loss and attention.fused_sparse_ok(q, kv_all):
            # Inference on a CPU: scores, selection and attention as one compiled call per layer
            # (prefill chunks and decode alike; it beats both the masked-dense and gathered forms).
            assert self.indexer is not None and qr is not None and index_k_all is not None
            iq, iw = self.indexer.queries(x, qr, rope)
            out_lat, _, extras.indices = attention.fused_sparse_attention(
                iq, index_k_all, iw, q_offset, self._absorbed_query(q_nope, q_pe), kv_all,
                self.config.index_topk, self.scale, self.rank,
            )  # fmt: skip
            out = self._absorbed_output(out_lat)
            return self.o_proj(out.reshape(B, S, H * self.v_dim).to(x.dtype)), extras
        if need_scores:
            assert self.indexer is not None and qr is not None and index_k_all is not None
            with torch.set_grad_enabled(indexer_loss and torch.is_grad_enabled()):
                iq, iw = self.indexer.queries(idx_in, qr.detach() if indexer_loss else qr, rope)
                scores = attention.indexer_scores(iq, index_k_all, iw, q_offset)  # (B, S, T)
            extras.indices = attention.select_topk(scores.detach(), self.config.index_topk)

        T = kv_all.shape[1]
        mask = None
        absorbed = (cache is not None and S <= _ABSORBED_MAX_QUERIES) or indexer_loss
        if sparse:
            assert extras.indices is not None
            if attention.prefers_masked_dense(q, T, extras.indices.shape[-1], absorbed=absorbed):
                mask = attention.selection_mask(extras.indices, T)  # (B, S, T); implies causality
                sparse = False
        lse = None
        if sparse or absorbed:
            q_abs = self._absorbed_query(q_nope, q_pe)
            if sparse:
                assert extras.indices is not None
                out_lat, lse = attention.sparse_mla(q_abs, kv_all, extras.indices, self.scale, self.rank)
            else:
                out_lat = attention.dense_mla(q_abs, kv_all, self.scale, self.rank, q_offset, mask)
            out = self._absorbed_output(out_lat)
            if indexer_loss and scores is not None:
                selected = extras.indices if (sparse or mask is not None) else None
                extras.indexer_loss = attention.indexer_kl_loss(
                    q_abs.detach(),
                    kv_all.detach(),
                    scores,
                    self.scale,
                    selected,
                    q_offset,
                    lse=lse.detach() if sparse else None,
                )
        else:
            out = self._mha_dense(q_nope, q_pe, kv_all, q_offset, mask)
        return self.o_proj(out.reshape(B, S, H * self.v_dim).to(x.dtype)), extras
