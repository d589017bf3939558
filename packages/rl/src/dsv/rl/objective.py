"""GRPO as modified in DeepSeek-V3.2 (spec §5): the objective as math on padded tensors, no I/O.

Every function takes right-padded ``[B, T]`` tensors and a ``[B, T]`` completion ``mask`` (bool or
0/1 float; 1 on the completion tokens that are trained on). ``B`` counts sampled sequences; groups
of ``G`` consecutive rows answer one prompt. ``logp`` is log π_θ of each completion token (with its
graph), ``old_logp`` log π_old (the policy that sampled; constant), ``ref_logp`` log π_ref (the
frozen reference). The objective, maximised (:func:`grpo_loss` returns its negative)::

    J = 1/G Σ_i 1/|o_i| Σ_t ( min(r_it Â_i, clip(r_it, 1-ε_low, 1+ε_high) Â_i) · M_i  −  β D_KL,it )
    r_it = π_θ(o_it) / π_old(o_it),   Â_i = R_i − mean(R of i's group)   (no std division)

with the four V3.2 stabilisers:

1. **Unbiased KL** (:func:`kl_unbiased`): ``D_KL = r · k3``, the k3 estimator reweighted by the
   ratio to the sampling policy, whose mean under π_old is KL(π_θ‖π_ref).
2. **Off-policy sequence masking** (:func:`off_policy_mask`): ``M_i = 0`` for a negative-advantage
   sequence whose mean log(π_old/π_θ) exceeds δ; it multiplies the policy-gradient term only.
3. **Keep Routing** (:func:`forced_routes_batch`, :func:`route_mismatch`): the MoE experts chosen at
   sampling time are forced in the training forward (``DSVForCausalLM(forced_routes=...)``).
4. **Keep Sampling Mask** (:func:`sampling_logprobs`, :class:`KeptSets`): π_θ is renormalised over
   the token set the sampler kept (top-k / top-p), so π_θ and π_old share one action space.

Variants, each a keyword of :func:`grpo_loss`: DAPO's asymmetric clip (``eps_high > eps_low``) and
token-sum aggregation (``aggregation="dapo"``), Dr. GRPO's constant normaliser (``"dr_grpo"``),
GSPO's length-normalised sequence ratio (``level="sequence"``), and a truncated importance-sampling
weight for the gap between the rollout engine's and the trainer's log-probs (``tis_cap``).

    from dsv.rl.objective import group_advantages, grpo_loss, sampling_logprobs
    adv = group_advantages(rewards, group_size=8)
    logp = sampling_logprobs(logits, tokens, temperature=1.0, keep=kept).logp
    terms = grpo_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, beta=0.01, opsm_delta=0.5)
    terms.total().backward()
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal, NamedTuple

import torch

from dsv.core.generate import scaled_logits
from dsv.train.losses import LossTerms

Scale = Literal["none", "group", "batch"]
KLEstimator = Literal["unbiased", "k3"]
Aggregation = Literal["grpo", "dr_grpo", "dapo"]
Level = Literal["token", "sequence"]


# ---------------------------------------------------------------------------------- advantages


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: Scale = "none", eps: float = 1e-6
) -> torch.Tensor:
    """``Â_i = R_i − mean(R of i's group)`` for ``rewards [B]`` in groups of ``group_size``
    consecutive rows; float32 ``[B]``.

    ``scale="none"`` (the default) is V3.2's form, with no std division (spec §5; Dr. GRPO argues
    the division overweights groups that barely differ). ``"group"`` divides by each group's std
    (the original GRPO), ``"batch"`` by the std of all ``B`` rewards; both use the unbiased std
    (``torch.std``, as TRL) plus ``eps``, so a group of equal rewards gets advantages 0.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be one reward per sequence, shape [B]; got {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (a group of one has no baseline), got {group_size}")
    if rewards.numel() % group_size:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of {group_size}: "
            f"B must be a multiple of group_size (G consecutive rows per prompt)"
        )
    if scale not in ("none", "group", "batch"):
        raise ValueError(f"scale must be 'none', 'group' or 'batch', got {scale!r}")
    grouped = rewards.float().view(-1, group_size)  # (B/G, G)
    adv = grouped - grouped.mean(1, keepdim=True)
    if scale == "group":
        adv = adv / (grouped.std(1, keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / (rewards.float().std() + eps)
    return adv.flatten()


# ---------------------------------------------------------------------------------- log-probs


class SamplingLogprobs(NamedTuple):
    """Result of :func:`sampling_logprobs`."""

    logp: torch.Tensor  # (B, T) log π of the tokens under the sampling distribution, with graph
    entropy: torch.Tensor | None  # (B, T) entropy of that distribution, detached (None when not asked)


class KeptSets(NamedTuple):
    """The kept sets of a ``[B, T]`` batch of positions, sparse: the ids each position kept.

    A dense ``[B, T, V]`` bool mask costs ``B·T·V`` bytes (a 32 x 4096 batch over V3's 129k
    vocabulary is 17 GB); the kept sets of top-k/top-p sampling are a few dozen ids each. A position
    without a set (padding, prompt, a sample from the full vocabulary) keeps every token.
    Build with :meth:`from_ids`; :func:`sampling_logprobs` masks the logits with it in place.
    """

    shape: tuple[int, int]  # (B, T)
    rows: torch.Tensor  # (R,) long: flat positions ``b * T + t`` that have a kept set
    pos: torch.Tensor  # (K,) long: the flat position of each kept id
    ids: torch.Tensor  # (K,) long: the kept token ids

    @classmethod
    def from_ids(
        cls, sets: Sequence[Sequence[torch.Tensor | None]], T: int, device: torch.device | str = "cpu"
    ) -> KeptSets:
        """``sets[b][t]``: the token ids position ``t`` of row ``b`` kept (None or empty: every
        token); rows shorter than ``T`` are padding after their end."""
        rows: list[int] = []
        sizes: list[int] = []
        ids: list[torch.Tensor] = []
        for b, row in enumerate(sets):
            if len(row) > T:
                raise ValueError(f"row {b} has {len(row)} positions, more than T={T}")
            for t, kept in enumerate(row):
                if kept is not None and kept.numel():
                    rows.append(b * T + t)
                    sizes.append(kept.numel())
                    ids.append(kept.reshape(-1))
        rows_t = torch.tensor(rows, dtype=torch.long)
        pos = rows_t.repeat_interleave(torch.tensor(sizes, dtype=torch.long)) if rows else rows_t
        flat = torch.cat(ids).long() if ids else torch.zeros(0, dtype=torch.long)
        return cls((len(sets), T), rows_t.to(device), pos.to(device), flat.to(device))

    def dense(self, vocab: int) -> torch.Tensor:
        """The same sets as a ``[B, T, V]`` bool mask (every token at positions without a set)."""
        B, T = self.shape
        keep = torch.ones(B * T, vocab, dtype=torch.bool, device=self.rows.device)
        keep[self.rows] = False
        keep[self.pos, self.ids] = True
        return keep.view(B, T, vocab)


def sampling_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float,
    keep: torch.Tensor | KeptSets | None = None,
    *,
    with_entropy: bool = True,
) -> SamplingLogprobs:
    """Log-probabilities of ``tokens [B, T]`` under the distribution the sampler drew from.

    The rule is :func:`dsv.core.generate.sample_next`'s: ``logits [B, T, V]`` divided by the
    temperature (:func:`~dsv.core.generate.scaled_logits`) and, with ``keep`` (the recorded kept
    sets: Keep Sampling Mask; a ``[B, T, V]`` bool mask or :class:`KeptSets`), every token outside
    the kept set at ``-inf`` before the log-softmax, so the probabilities renormalise over the kept
    set. A position whose kept set is empty (padding) is left unmasked so its value stays finite; a
    token outside a non-empty kept set gets ``-inf`` (it could not have been sampled).

    Memory: one fp32 ``[B, T, V]`` copy of the logits, the only vocabulary-sized tensor kept for
    backward (the temperature and the masking are applied in place on it, the log-softmax is
    ``gather - logsumexp``, and nothing keeps ``logits`` itself: the caller may drop them). The
    entropy (a statistic, no graph) is computed one row at a time, adding a ``[T, V]`` buffer.
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [B, T, V] and tokens [B, T]; got {tuple(logits.shape)} and {tuple(tokens.shape)}"
        )
    if isinstance(keep, KeptSets):
        if tuple(keep.shape) != tuple(logits.shape[:2]):
            raise ValueError(
                f"keep covers positions {tuple(keep.shape)}, the logits {tuple(logits.shape[:2])}"
            )
    elif keep is not None and (keep.shape != logits.shape or keep.dtype != torch.bool):
        raise ValueError(f"keep must be a bool tensor shaped like logits {tuple(logits.shape)}, got "
                         f"{keep.dtype} {tuple(keep.shape)}")  # fmt: skip
    if not temperature > 0:
        raise ValueError(
            f"temperature must be > 0 for training log-probs, got {temperature}: greedy rollouts "
            "(temperature 0) give every sampled token probability 1, with no ratio to optimise"
        )
    scaled = scaled_logits(logits, temperature)  # (B, T, V) fp32, the one copy
    if isinstance(keep, KeptSets):
        if keep.rows.numel():
            # Positions with a set: save the kept values, fill the row with -inf, put them back.
            flat = scaled.view(-1, scaled.shape[-1])
            kept = flat[keep.pos, keep.ids]
            flat.index_fill_(0, keep.rows, float("-inf"))
            flat.index_put_((keep.pos, keep.ids), kept)
    elif keep is not None:
        scaled.masked_fill_(~(keep | ~keep.any(-1, keepdim=True)), float("-inf"))
    lse = scaled.logsumexp(-1)  # (B, T)
    logp = scaled.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1) - lse
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = torch.stack(
                [
                    torch.special.entr((scaled[b] - lse[b, :, None]).exp()).sum(-1)
                    for b in range(scaled.shape[0])
                ]
            )
    return SamplingLogprobs(logp, entropy)


# ---------------------------------------------------------------------------------- KL estimators


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """The plain k3 estimator per token: ``π_ref/π_θ − log(π_ref/π_θ) − 1`` (always >= 0).

    Its mean over tokens drawn from π_θ is KL(π_θ‖π_ref); over tokens drawn from another policy
    (π_old, as in every off-policy step) it is biased, which :func:`kl_unbiased` corrects.
    ``ref_logp`` is detached (the reference is frozen); the gradient reaches ``logp`` only.
    """
    d = ref_logp.detach() - logp
    return d.exp() - d - 1


def kl_unbiased(logp: torch.Tensor, ref_logp: torch.Tensor, old_logp: torch.Tensor) -> torch.Tensor:
    """V3.2's ratio-corrected k3 per token: ``(π_θ/π_old) · k3`` (spec §5, stabiliser 1).

    For tokens drawn from π_old, ``E_old[(π_θ/π_old) k3] = E_θ[k3] = KL(π_θ‖π_ref)``.

    What is detached: ``old_logp`` (the sampling policy; the ratio only reweights samples it drew)
    and ``ref_logp`` (the frozen reference). ``logp`` keeps its graph in *both* factors, as in the
    spec's D_KL: ``∇(r k3) = r (k3 + 1 − π_ref/π_θ) ∇log π_θ``, whose mean under π_old is exactly
    ``∇ KL(π_θ‖π_ref)`` (the score-function part ``r k3 ∇log π_θ`` comes from the ratio's
    gradient; detaching the ratio would drop it and bias the gradient, as plain k3's is).
    """
    return (logp - old_logp.detach()).exp() * kl_k3(logp, ref_logp)


# ---------------------------------------------------------------------------------- masking


def off_policy_mask(
    advantages: torch.Tensor, logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, delta: float
) -> torch.Tensor:
    """Off-Policy Sequence Masking (spec §5, stabiliser 2): float ``[B]``, 0 for the sequences to
    drop from the policy-gradient term, 1 for the others.

    A sequence is dropped when its advantage is negative *and* the mean over its tokens of
    ``old_logp − logp`` (a sequence-level estimate of KL(π_old‖π_θ)) is strictly above ``delta``.
    Positive- (and zero-) advantage sequences are never dropped. ``old_logp`` should be the rollout
    engine's log-probs, so the mask covers train/inference mismatch as well as staleness; ``logp``
    is used detached (the mask is a constant of the step).
    """
    m = _weights(mask, logp)
    gap = torch.where(m != 0, old_logp.detach() - logp.detach(), 0.0)
    seq_gap = _seq_mean(gap, m)
    dropped = (advantages.detach().to(seq_gap.device) < 0) & (seq_gap > delta)
    return (~dropped).to(logp.dtype)


# ---------------------------------------------------------------------------------- the objective


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float | torch.Tensor = 0.0,
    kl: KLEstimator = "unbiased",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: Aggregation = "grpo",
    max_len: int | None = None,
    level: Level = "token",
    opsm_delta: float | None = None,
    behaviour_logp: torch.Tensor | None = None,
    tis_cap: float | None = None,
) -> LossTerms:
    """The GRPO loss (``-J``) with V3.2's stabilisers, as :class:`~dsv.train.losses.LossTerms`.

    Terms (weight 1 each; ``total()`` is the loss):

    - ``pg``: ``−min(r Â, clip(r, 1−eps_low, 1+eps_high) Â) · M_i · w_t``, aggregated.
      ``level="token"`` uses the per-token ratio; ``"sequence"`` (GSPO) the length-normalised
      sequence ratio ``exp(mean_t log r_it)`` on every token of the sequence. ``M_i`` is
      :func:`off_policy_mask` with ``opsm_delta`` (None: no masking), computed against
      ``behaviour_logp`` when given (the engine's log-probs), else ``old_logp``. ``w_t`` is the
      truncated importance weight ``min(exp(old_logp − behaviour_logp), tis_cap)`` (detached) when
      both are given, for ``old_logp`` recomputed by the trainer; else 1.
    - ``kl`` (only with ``ref_logp``): ``β_i · D_KL`` aggregated like ``pg``, never masked by OPSM.
      ``kl="unbiased"`` is :func:`kl_unbiased` (its ratio against ``old_logp``), ``"k3"`` is
      :func:`kl_k3`. ``beta`` is a float or a ``[B]`` tensor (a β per task family); β is inside
      the term because it can differ per row.

    Aggregations of a per-token ``x [B, T]``: ``"grpo"`` = ``1/B Σ_i 1/|o_i| Σ_t x`` (the spec's
    form: the mean over sequences of each sequence's token mean); ``"dr_grpo"`` =
    ``Σ x / (B · max_len)`` (``max_len`` defaults to ``T``); ``"dapo"`` = ``Σ x / Σ|o_i|``.

    Statistics (detached, token means over the completion unless said): ``clip_frac_low`` (tokens
    where the lower clip binds: ``Â < 0`` and ``r < 1−eps_low``), ``clip_frac_high`` (``Â > 0`` and
    ``r > 1+eps_high``), ``opsm_masked_frac`` (share of the B sequences masked), ``ratio_mean``,
    ``approx_kl_old`` (k3 estimate of KL(π_old‖π_θ)), ``kl_ref`` (the KL estimate to the reference,
    without β; with ``ref_logp``) and ``tis_weight_mean`` (with ``behaviour_logp`` and ``tis_cap``).

    Padding positions (``mask == 0``) may hold anything, ``-inf`` included: they are replaced by 0
    before any arithmetic, so no ``nan`` reaches the values or the gradient.
    """
    B, T = _check_shapes(logp, old_logp=old_logp, mask=mask, ref_logp=ref_logp, behaviour_logp=behaviour_logp)
    if advantages.shape != (B,):
        raise ValueError(
            f"advantages must be one value per sequence, shape [{B}]; got {tuple(advantages.shape)}"
        )
    if kl not in ("unbiased", "k3"):
        raise ValueError(f"kl must be 'unbiased' or 'k3', got {kl!r}")
    if aggregation not in ("grpo", "dr_grpo", "dapo"):
        raise ValueError(f"aggregation must be 'grpo', 'dr_grpo' or 'dapo', got {aggregation!r}")
    if level not in ("token", "sequence"):
        raise ValueError(f"level must be 'token' or 'sequence' (GSPO), got {level!r}")
    if not 0 <= eps_low < 1 or eps_high < 0:
        raise ValueError(f"clip range needs 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len (dr_grpo's normaliser) must be >= 1, got {max_len}")
    if tis_cap is not None and not tis_cap > 0:
        raise ValueError(f"tis_cap must be > 0 (typically 2), got {tis_cap}")
    beta_rows = _beta(beta, B, logp)
    if ref_logp is None and bool((beta_rows != 0).any()):
        raise ValueError("beta > 0 needs ref_logp (the reference policy's log-probs of the same tokens)")

    m = _weights(mask, logp)
    valid = m != 0
    # Padding may hold -inf (tokens outside an empty kept set); zero it before exp or the 0 * nan
    # of a masked position would reach the gradient.
    logp = torch.where(valid, logp, 0.0)
    old = torch.where(valid, old_logp.detach(), 0.0)
    adv = advantages.detach().to(logp.device, logp.dtype)[:, None]  # (B, 1)

    if level == "token":
        log_ratio = logp - old
    else:
        log_ratio = _seq_mean(logp - old, m)[:, None].expand(B, T)
    ratio = log_ratio.exp()
    pg = -torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)  # (B, T)

    sampled = old if behaviour_logp is None else torch.where(valid, behaviour_logp.detach(), 0.0)
    keep_seq = torch.ones(B, dtype=logp.dtype, device=logp.device)
    if opsm_delta is not None:
        keep_seq = off_policy_mask(advantages, logp, sampled, m, opsm_delta)
    pg = pg * keep_seq[:, None]
    tis = None
    if behaviour_logp is not None and tis_cap is not None:
        tis = (old - sampled).exp().clamp(max=tis_cap)
        pg = pg * tis

    terms = LossTerms().add("pg", _aggregate(pg, m, aggregation, max_len))
    with torch.no_grad():
        r = ratio.detach()
        terms.note("clip_frac_low", _token_mean(((adv < 0) & (r < 1 - eps_low)).to(m.dtype), m))
        terms.note("clip_frac_high", _token_mean(((adv > 0) & (r > 1 + eps_high)).to(m.dtype), m))
        terms.note("opsm_masked_frac", 1 - keep_seq.mean())
        terms.note("ratio_mean", _token_mean(r, m))
        terms.note("approx_kl_old", _token_mean(r - 1 - log_ratio.detach(), m))
        if tis is not None:
            terms.note("tis_weight_mean", _token_mean(tis, m))
    if ref_logp is not None:
        ref = torch.where(valid, ref_logp.detach(), 0.0)
        d = kl_unbiased(logp, ref, old) if kl == "unbiased" else kl_k3(logp, ref)
        terms.add("kl", _aggregate(beta_rows[:, None] * d, m, aggregation, max_len))
        terms.note("kl_ref", _token_mean(d.detach(), m))
    return terms


# ---------------------------------------------------------------------------------- Keep Routing


def routes_from_steps(step_routes: Sequence[Sequence[torch.Tensor | None]]) -> list[torch.Tensor | None]:
    """One sequence's routes as recorded step by step (``GenerateOutput.routes``: per step, per
    layer ``[1, S_step, k]`` or None) -> per layer ``[positions, k]`` (None for dense layers)."""
    if not step_routes:
        raise ValueError("no recorded steps: generate with return_routes=True")
    layers = len(step_routes[0])
    out: list[torch.Tensor | None] = []
    for layer in range(layers):
        parts = [step[layer] for step in step_routes]
        if any(p is None for p in parts):
            if not all(p is None for p in parts):
                raise ValueError(f"layer {layer} is dense in some steps and routed in others")
            out.append(None)
            continue
        out.append(torch.cat([p.reshape(-1, p.shape[-1]) for p in parts if p is not None]))
    return out


def forced_routes_batch(
    routes_per_seq: Sequence[Sequence[torch.Tensor | None]], lengths: Sequence[int], pad: int
) -> list[torch.Tensor | None]:
    """Per-layer ``forced_routes`` ``[B, pad, k]`` for a right-padded batch (Keep Routing).

    ``routes_per_seq[b][layer]`` is sequence ``b``'s recorded expert ids ``[n_b, k]`` (None for a
    dense layer; every sequence has the same layers), of which the first ``lengths[b]`` positions
    are used; ``pad`` is the batch's padded length. Padding positions get the experts
    ``0 .. k-1``: valid ids, so the forced forward runs, on positions whose outputs nobody reads.
    """
    if not routes_per_seq or len(routes_per_seq) != len(lengths):
        raise ValueError(
            f"need one recorded route list and one length per sequence, got {len(routes_per_seq)} and {len(lengths)}"
        )
    n_layers = len(routes_per_seq[0])
    out: list[torch.Tensor | None] = []
    for layer in range(n_layers):
        per_seq = []
        for b, routes in enumerate(routes_per_seq):
            if len(routes) != n_layers:
                raise ValueError(
                    f"sequence {b} has routes for {len(routes)} layers, sequence 0 for {n_layers}"
                )
            per_seq.append(routes[layer])
        if all(r is None for r in per_seq):
            out.append(None)
            continue
        if any(r is None for r in per_seq):
            raise ValueError(f"layer {layer} is routed in some sequences and dense (None) in others")
        first = per_seq[0]
        assert first is not None
        k = first.shape[-1]
        fill = torch.arange(k, dtype=torch.long, device=first.device)
        batch = fill.repeat(len(per_seq), pad, 1)  # (B, pad, k)
        for b, (r, n) in enumerate(zip(per_seq, lengths, strict=True)):
            assert r is not None
            r = r.reshape(-1, r.shape[-1])
            if r.shape[-1] != k:
                raise ValueError(
                    f"layer {layer}: sequence {b} records {r.shape[-1]} experts per token, not {k}"
                )
            if not 0 <= n <= min(pad, r.shape[0]):
                raise ValueError(
                    f"sequence {b}: length {n} must be in [0, min(pad={pad}, recorded positions={r.shape[0]})]"
                )
            batch[b, :n] = r[:n].to(batch.device, torch.long)
        out.append(batch)
    return out


@contextmanager
def free_routes_of(model: torch.nn.Module) -> Iterator[list[torch.Tensor | None]]:
    """Within the block, a forward of ``model`` (a ``DSVForCausalLM``) also fills the yielded list
    with, per layer, the experts its gate would choose itself (``[B, S, k]``; None for dense
    layers): the gate's own top-k on the layer's actual input. With several forwards, the last one's.

    With ``forced_routes`` the forward runs the forced experts and the gate is asked once more,
    without them and without a graph (one ``[B·S, E]`` product per MoE layer, no second forward);
    without, its own choice is what ran. So one training forward yields both the replayed update and
    :func:`route_mismatch`'s free routes; each MoE layer's free choice is taken on the hidden states
    the forced layers before it produced, which isolates every layer's own disagreement.
    """
    from dsv.core.model.moe import MoE

    blocks = list(model.blocks)  # type: ignore[attr-defined]
    free: list[torch.Tensor | None] = [None] * len(blocks)
    handles = []

    def hook_for(layer: int) -> Callable[[torch.nn.Module, tuple, tuple], None]:
        def hook(moe: torch.nn.Module, args: tuple, out: tuple) -> None:
            x, forced = args[0], args[1] if len(args) > 1 else None
            if forced is None:
                idx = out[1]
            else:
                with torch.no_grad():
                    idx = moe.gate(x.detach().reshape(-1, x.shape[-1]))[1].view(*x.shape[:-1], -1)
            free[layer] = idx.detach()

        return hook

    for layer, block in enumerate(blocks):
        if isinstance(block.mlp, MoE):
            handles.append(block.mlp.register_forward_hook(hook_for(layer)))
    try:
        yield free
    finally:
        for h in handles:
            h.remove()


def route_mismatch(
    free_routes: Sequence[torch.Tensor | None], recorded: Sequence[torch.Tensor | None], mask: torch.Tensor
) -> float:
    """Share of (token, MoE layer) pairs, over tokens where ``mask [B, S]`` is set, whose expert
    *set* in ``free_routes`` (the gate's own top-k now) differs from ``recorded`` (per layer
    ``[B, S, k]``, None for dense layers): how far Keep Routing moves the update off the current
    router. 0.0 when there is no pair."""
    if len(free_routes) != len(recorded):
        raise ValueError(f"free_routes has {len(free_routes)} layers, recorded {len(recorded)}")
    valid = mask != 0
    differ = 0
    pairs = 0
    for layer, (free, rec) in enumerate(zip(free_routes, recorded, strict=True)):
        if free is None or rec is None:
            if free is not rec:
                raise ValueError(f"layer {layer} is dense in one route list and routed in the other")
            continue
        if free.shape != rec.shape or free.shape[:2] != mask.shape:
            raise ValueError(
                f"layer {layer}: routes {tuple(free.shape)} and {tuple(rec.shape)} must match, with mask {tuple(mask.shape)}"
            )
        changed = (free.sort(-1).values != rec.to(free.device).sort(-1).values).any(-1)  # (B, S)
        differ += int((changed & valid.to(changed.device)).sum())
        pairs += int(valid.sum())
    return differ / pairs if pairs else 0.0


# ---------------------------------------------------------------------------------- helpers


def _weights(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.to(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.float32)


def _seq_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per-row mean of ``x [B, T]`` over the mask's tokens; 0 for a row without tokens."""
    n = m.sum(1)
    return torch.where(n > 0, (x * m).sum(1) / n.clamp_min(torch.finfo(m.dtype).tiny), 0.0)


def _token_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (x * m).sum() / m.sum().clamp_min(1)


def _aggregate(x: torch.Tensor, m: torch.Tensor, how: Aggregation, max_len: int | None) -> torch.Tensor:
    B, T = x.shape
    if how == "grpo":
        return _seq_mean(x, m).sum() / B
    if how == "dr_grpo":
        return (x * m).sum() / (B * (T if max_len is None else max_len))
    return (x * m).sum() / m.sum().clamp_min(1)


def _beta(beta: float | torch.Tensor, B: int, like: torch.Tensor) -> torch.Tensor:
    b = torch.as_tensor(beta, dtype=like.dtype, device=like.device).detach()
    if b.dim() == 0:
        b = b.expand(B)
    if b.shape != (B,):
        raise ValueError(f"beta must be a float or one value per sequence, shape [{B}]; got {tuple(b.shape)}")
    if bool((b < 0).any()):
        raise ValueError("beta must be >= 0 (it weights a penalty)")
    return b


def _check_shapes(logp: torch.Tensor, **others: torch.Tensor | None) -> tuple[int, int]:
    if logp.dim() != 2:
        raise ValueError(
            f"logp must be [B, T] (one log-prob per completion position), got {tuple(logp.shape)}"
        )
    for name, t in others.items():
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{name} must have logp's shape {tuple(logp.shape)}, got {tuple(t.shape)}")
    return logp.shape[0], logp.shape[1]


__all__ = [
    "KeptSets",
    "SamplingLogprobs",
    "forced_routes_batch",
    "free_routes_of",
    "group_advantages",
    "grpo_loss",
    "kl_k3",
    "kl_unbiased",
    "off_policy_mask",
    "route_mismatch",
    "routes_from_steps",
    "sampling_logprobs",
]
