"""The DeepSeek-V3.2 decoder: embeddings -> blocks (MLA/DSA + dense MLP or MoE) -> RMSNorm -> head.

Module and parameter names are the Hub's (``model.layers.3.self_attn.indexer.wq_b.weight``,
``model.layers.5.mlp.experts.17.up_proj.weight``...), so ``state_dict()`` *is* the checkpoint.
The optional MTP modules live at ``model.layers.{num_hidden_layers + i}`` as on the Hub.

Forward extras, each on request: per-layer MoE routes (and replaying them: Keep Routing), per-layer
DSA selections, the indexer distillation loss, the MoE balance loss, MTP logits.

The MTP layers are full blocks: their indexer selects keys like any other once a sequence is longer
than ``index_topk``, so it is trained on the same KL loss (and its selections and expert loads are
reported beside the main layers'), and their MoE takes part in load balancing.

Run a forward::

    from dsv.core.model import DSVForCausalLM
    from dsv.core.presets import tiny
    model = DSVForCausalLM(tiny())
    out = model(torch.randint(0, 1024, (1, 16)), return_routes=True)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dsv.core.cache import KVCache
from dsv.core.config import ModelConfig
from dsv.core.model.layers import MLP, RMSNorm
from dsv.core.model.mla import MLA
from dsv.core.model.moe import MoE
from dsv.core.model.rope import Rotary, inv_frequencies


@dataclass
class ModelOutput:
    """Result of :meth:`DSVForCausalLM.forward`."""

    logits: torch.Tensor  # (B, S, V) fp32
    hidden: torch.Tensor  # (B, S, d) final hidden state before the norm
    routes: list[torch.Tensor | None] | None = None  # per layer: (B, S, k) expert ids, None for dense layers
    indices: list[torch.Tensor | None] | None = None  # per layer: (B, S, K) int32 DSA selections
    indexer_loss: torch.Tensor | None = None  # mean over the indexers that ran (MTP's included) of the KL loss
    aux_loss: torch.Tensor | None = None  # sum over the MoE layers that ran of the sequence-wise balance loss
    expert_load: list[torch.Tensor] = field(default_factory=list)  # per main MoE layer: tokens per expert
    mtp_logits: list[torch.Tensor] | None = None  # per MTP depth d: (B, S-1-d, V), predicting token t+2+d
    mtp_indices: list[torch.Tensor | None] | None = None  # per MTP depth d: (B, S-1-d, K) DSA selections
    mtp_expert_load: list[torch.Tensor] = field(default_factory=list)  # per MTP MoE layer that ran


class Block(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + ffn(norm(h))``."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: MLP | MoE = (
            MoE(config) if config.is_moe_layer(layer) else MLP(config.hidden_size, config.intermediate_size)
        )

    def forward(
        self,
        x: torch.Tensor,
        rope: Rotary,
        q_offset: torch.Tensor,
        *,
        cache: KVCache | None,
        use_sparse: bool,
        want_indices: bool,
        indexer_loss: bool,
        forced_route: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, object]:
        a, extras = self.self_attn(
            self.input_layernorm(x),
            rope,
            q_offset,
            layer=self.layer,
            cache=cache,
            use_sparse=use_sparse,
            want_indices=want_indices,
            indexer_loss=indexer_loss,
        )
        h = x + a
        route = None
        if isinstance(self.mlp, MoE):
            f, route = self.mlp(self.post_attention_layernorm(h), forced_route)
        else:
            f = self.mlp(self.post_attention_layernorm(h))
        return h + f, route, extras


class MTPLayer(Block):
    """Multi-token prediction depth (DeepSeek-V3 §2.2): combine ``RMSNorm(h_t)`` with
    ``RMSNorm(emb(x_{t+1}))``, project 2d -> d, run one block, predict ``x_{t+2}`` with its own
    norm + head (stored separately on the Hub, initialised from the main ones)."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__(config, layer)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.shared_head.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class DSVModel(nn.Module):
    """Embeddings, blocks (then MTP layers) and the final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        layers: list[nn.Module] = [Block(config, i) for i in range(config.num_hidden_layers)]
        layers += [
            MTPLayer(config, config.num_hidden_layers + i) for i in range(config.num_nextn_predict_layers)
        ]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DSVForCausalLM(nn.Module):
    """DeepSeek-V3.2 (or V3) causal LM with Hub-compatible parameter names."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DSVModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # RoPE frequencies are derived, never stored, and stay fp32 whatever dtype the model is cast to.
        self._inv_freq = inv_frequencies(config)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    # ------------------------------------------------------------------ init

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) for projections/embeddings, ones for norms, zeros for biases."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, MoE):
                module.gate.weight.normal_(0.0, std, generator=generator)
                module.gate.e_score_correction_bias.zero_()
        for mtp in self.mtp_layers:
            mtp.embed_tokens.weight.copy_(self.model.embed_tokens.weight)
            mtp.shared_head.head.weight.copy_(self.lm_head.weight)

    @property
    def inv_freq(self) -> torch.Tensor:
        device = self.model.embed_tokens.weight.device
        if self._inv_freq.device != device and device.type != "meta":
            self._inv_freq = self._inv_freq.to(device)
        return self._inv_freq

    @property
    def blocks(self) -> list[Block]:
        return list(self.model.layers)[: self.config.num_hidden_layers]

    @property
    def mtp_layers(self) -> list[MTPLayer]:
        return list(self.model.layers)[self.config.num_hidden_layers :]  # type: ignore[return-value]

    @property
    def moe_layers(self) -> list[MoE]:
        """The main blocks' MoE layers (the ones ``routes`` and ``expert_load`` follow)."""
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]

    @property
    def mtp_moe_layers(self) -> list[MoE]:
        """The MTP layers' MoE (``mtp_expert_load`` follows them when the MTP layers ran)."""
        return [m.mlp for m in self.mtp_layers if isinstance(m.mlp, MoE)]

    def indexer_parameters(self) -> list[nn.Parameter]:
        """Parameters of every lightning indexer (what the DSA warm-up trains)."""
        return [p for name, p in self.named_parameters() if ".indexer." in name]

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        return_routes: bool = False,
        return_indices: bool = False,
        forced_routes: list[torch.Tensor | None] | None = None,
        use_sparse: bool | None = None,
        indexer_loss: bool = False,
        return_mtp: bool = False,
        logits_to_keep: int = 0,
    ) -> ModelOutput:
        """Run the model on ``input_ids [B, S]`` (appended after the cache's contents, if any).

        - ``forced_routes``: per layer (None for dense layers) expert ids ``[B, S, k]`` to use instead
          of the gate's top-k (Keep Routing).
        - ``use_sparse``: False forces dense attention even with an indexer (the DSA warm-up and the
          dense baseline); default True when the config has an indexer.
        - ``indexer_loss``: also compute the indexer KL loss (dense target when ``use_sparse`` is
          False, selected-set target otherwise), of the MTP layers' indexers too when they run.
        - ``return_mtp``: run the MTP layers (``mtp_logits``; with ``return_indices`` their
          selections in ``mtp_indices``).
        - ``logits_to_keep``: compute the LM head on the last N positions only (0: all, the
          default); ``logits`` is then ``[B, N, V]``. Prefill for generation needs one: the head over
          every prompt position can cost more than the layers of a small model.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        if logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be >= 0 (0 keeps every position), got {logits_to_keep}")
        B, S = input_ids.shape
        if forced_routes is not None and len(forced_routes) != self.config.num_hidden_layers:
            raise ValueError(
                f"forced_routes must have one entry per layer ({self.config.num_hidden_layers}), got {len(forced_routes)}"
            )
        sparse = self.config.has_indexer if use_sparse is None else (use_sparse and self.config.has_indexer)
        device = input_ids.device
        q_offset = (
            cache.offsets().to(device)
            if cache is not None
            else torch.zeros(B, dtype=torch.long, device=device)
        )
        positions = q_offset.view(B, 1) + torch.arange(S, device=device).view(1, S)
        rope = Rotary.at(self.config, positions, self.inv_freq)

        h = self.model.embed_tokens(input_ids)
        routes: list[torch.Tensor | None] = []
        indices: list[torch.Tensor | None] = []
        index_losses: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            h, route, extras = block(
                h,
                rope,
                q_offset,
                cache=cache,
                use_sparse=sparse,
                want_indices=return_indices,
                indexer_loss=indexer_loss,
                forced_route=None if forced_routes is None else forced_routes[i],
            )
            routes.append(route)
            indices.append(extras.indices)  # type: ignore[attr-defined]
            if extras.indexer_loss is not None:  # type: ignore[attr-defined]
                index_losses.append(extras.indexer_loss)  # type: ignore[attr-defined]

        # Balance losses are read here, right after the blocks ran, so an MTP MoE's value from an
        # earlier forward never leaks in; the MTP layers add theirs in _mtp.
        aux = [m.aux_loss for m in self.moe_layers if m.aux_loss is not None]
        expert_load = [m.expert_load for m in self.moe_layers if m.expert_load is not None]
        mtp = _MTPOutputs()
        if return_mtp and self.mtp_layers:
            self._mtp(h, input_ids, rope, sparse, indexer_loss, return_indices, mtp)
            index_losses += mtp.index_losses
            aux += mtp.aux
        if cache is not None:
            cache.advance(S)
        last = h[:, -logits_to_keep:] if logits_to_keep else h
        logits = nn.functional.linear(self.model.norm(last).float(), self.lm_head.weight.float())
        return ModelOutput(
            logits=logits,
            hidden=h,
            routes=routes if return_routes else None,
            indices=indices if return_indices else None,
            indexer_loss=torch.stack(index_losses).mean() if index_losses else None,
            # Summed over layers: DeepSeek-V3 (arXiv:2412.19437, §2.1.2, eq. 17-20) defines
            # L_Bal = alpha * sum_i f_i P_i for one MoE layer's router, and DeepSeek's own
            # modeling_deepseek.py adds each MoE layer's term to the objective (AddAuxiliaryLoss in
            # every layer's forward), so alpha is per layer and does not shrink with depth.
            aux_loss=torch.stack(aux).sum() if aux else None,
            expert_load=expert_load,
            mtp_logits=mtp.logits if return_mtp and self.mtp_layers else None,
            mtp_indices=mtp.indices if return_mtp and self.mtp_layers and return_indices else None,
            mtp_expert_load=mtp.expert_load,
        )

    def _mtp(
        self,
        h: torch.Tensor,
        input_ids: torch.Tensor,
        rope: Rotary,
        sparse: bool,
        indexer_loss: bool,
        want_indices: bool,
        out: _MTPOutputs,
    ) -> None:
        for d, mtp in enumerate(self.mtp_layers):
            n = h.shape[1] - 1
            if n <= 0:
                break
            emb = mtp.embed_tokens(input_ids[:, 1 + d : 1 + d + n])
            x = mtp.eh_proj(torch.cat((mtp.enorm(emb), mtp.hnorm(h[:, :n])), dim=-1))
            zero = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
            x, _, extras = mtp(
                x, rope.head(n), zero,
                cache=None, use_sparse=sparse, want_indices=want_indices, indexer_loss=indexer_loss,
                forced_route=None,
            )  # fmt: skip
            out.logits.append(
                nn.functional.linear(mtp.shared_head.norm(x).float(), mtp.shared_head.head.weight.float())
            )
            out.indices.append(extras.indices)  # type: ignore[attr-defined]
            if extras.indexer_loss is not None:  # type: ignore[attr-defined]
                out.index_losses.append(extras.indexer_loss)  # type: ignore[attr-defined]
            if isinstance(mtp.mlp, MoE):
                if mtp.mlp.aux_loss is not None:
                    out.aux.append(mtp.mlp.aux_loss)
                if mtp.mlp.expert_load is not None:
                    out.expert_load.append(mtp.mlp.expert_load)
            h = x


@dataclass
class _MTPOutputs:
    """What the MTP layers of one forward produced (gathered by :meth:`DSVForCausalLM._mtp`)."""

    logits: list[torch.Tensor] = field(default_factory=list)
    indices: list[torch.Tensor | None] = field(default_factory=list)
    index_losses: list[torch.Tensor] = field(default_factory=list)
    aux: list[torch.Tensor] = field(default_factory=list)
    expert_load: list[torch.Tensor] = field(default_factory=list)


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """Total and per-token-active parameter counts, with and without the MTP modules (meta device)."""
    with torch.device("meta"):
        model = DSVForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    mtp = sum(p.numel() for layer in model.mtp_layers for p in layer.parameters())
    routed = 0
    inactive = 0
    for layer in model.model.layers:
        if isinstance(layer.mlp, MoE):
            per_expert = sum(p.numel() for p in layer.mlp.experts[0].parameters())
            n = len(layer.mlp.experts)
            in_main = layer in model.blocks
            routed += per_expert * n if in_main else 0
            inactive += per_expert * (n - config.num_experts_per_tok) if in_main else 0
    main = total - mtp
    return {
        "total": total,
        "total_without_mtp": main,
        "mtp": mtp,
        "routed_experts": routed,
        "active_per_token": main - inactive,
    }
