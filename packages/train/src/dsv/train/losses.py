"""Loss terms, named: the one home of what dsv-train and dsv-rl put into ``backward``.

A :class:`LossTerms` holds scalar loss tensors under names, each with its weight, plus detached
statistics for the logs. ``total()`` is what goes to ``backward``; ``metrics()`` is what gets
logged: every term's *unweighted* value and every statistic, as floats (one device sync, at log
time, not per term). dsv-rl's GRPO objective (:func:`dsv.rl.objective.grpo_loss`) returns the same
container with its ``pg`` and ``kl`` terms.

The pretraining / SFT terms (:func:`lm_terms`), from one :class:`~dsv.core.model.ModelOutput`:

- ``lm``: next-token cross-entropy, a sum over target tokens times ``token_scale``;
- ``mtp``: the multi-token-prediction cross-entropy, averaged over the MTP depths, same scale;
- ``aux``: the sequence-wise balance loss (DeepSeek-V3 eq. 17-20, unweighted in the model),
  summed over the MoE layers that ran, the MTP layer's included;
- ``indexer``: the lightning indexer's KL loss (spec §3), dense or on the selected set.

The two scales exist for data parallelism: with ``token_scale = world / n_targets`` (targets of
the whole step, on every process) and ``batch_scale = micro_batch / global_batch * world``, each
process's micro-batch contributes exactly its share of the global mean, and DDP's gradient average
undoes the ``world`` factor. Summing a term's values over micro-batches and processes and dividing
by ``world`` gives the step's loss (that is how :func:`dsv.train.trainer.train` logs them). The
defaults make each term this batch's own mean.

    terms = lm_terms(model(ids, return_mtp=True), labels, mtp_weight=0.3)
    terms.total().backward()
    print(terms.metrics())  # {'lm': ..., 'mtp': ...}
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from dsv.train.data import IGNORE_INDEX

if TYPE_CHECKING:
    from dsv.core.model import ModelOutput


@dataclass(frozen=True)
class LossTerm:
    """One named term: a scalar tensor (with its graph) and the weight it enters the total with."""

    value: torch.Tensor
    weight: float = 1.0


class LossTerms:
    """Named scalar loss terms with their weights, and detached statistics to log beside them.

    Names are unique across terms and statistics, so :meth:`metrics` is one flat dict.
    """

    def __init__(self) -> None:
        self._terms: dict[str, LossTerm] = {}
        self._stats: dict[str, torch.Tensor | float] = {}

    def add(self, name: str, value: torch.Tensor, weight: float = 1.0) -> LossTerms:
        """Add term ``name`` (a scalar tensor) entering :meth:`total` as ``weight * value``."""
        self._check_new(name)
        if value.dim() != 0:
            raise ValueError(f"loss term {name!r} must be a scalar tensor, got shape {tuple(value.shape)}")
        self._terms[name] = LossTerm(value, float(weight))
        return self

    def note(self, name: str, value: torch.Tensor | float) -> LossTerms:
        """Record statistic ``name`` for the logs (detached; never part of the total)."""
        self._check_new(name)
        self._stats[name] = value.detach() if isinstance(value, torch.Tensor) else float(value)
        return self

    def _check_new(self, name: str) -> None:
        if name in self._terms or name in self._stats:
            raise ValueError(f"{name!r} is already recorded in these loss terms; give each term one name")

    def __contains__(self, name: object) -> bool:
        return name in self._terms

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._terms[name].value

    def __iter__(self) -> Iterator[str]:
        return iter(self._terms)

    def __len__(self) -> int:
        return len(self._terms)

    def weight(self, name: str) -> float:
        """The weight term ``name`` enters the total with."""
        return self._terms[name].weight

    @property
    def stats(self) -> dict[str, torch.Tensor | float]:
        """The statistics recorded with :meth:`note` (a copy)."""
        return dict(self._stats)

    def total(self) -> torch.Tensor:
        """``sum(weight * value)`` over the terms: the scalar to call ``backward`` on."""
        if not self._terms:
            raise ValueError("no loss terms were added: nothing to optimise")
        terms = iter(self._terms.values())
        first = next(terms)
        out = first.value * first.weight
        for t in terms:
            out = out + t.value * t.weight
        return out

    def stacked(self, names: Sequence[str]) -> torch.Tensor:
        """Detached float64 vector of the named terms' values in ``names`` order, 0 for a term that
        is absent: one tensor to accumulate over micro-batches and all-reduce across processes."""
        if not self._terms:
            return torch.zeros(len(names), dtype=torch.float64)
        device = next(iter(self._terms.values())).value.device
        return torch.stack(
            [
                self._terms[n].value.detach().double()
                if n in self._terms
                else torch.zeros((), dtype=torch.float64, device=device)
                for n in names
            ]
        )

    def metrics(self) -> dict[str, float]:
        """Every term's unweighted value, then every statistic, as floats (for logging)."""
        out = {name: float(t.value.detach()) for name, t in self._terms.items()}
        out.update({name: float(v) for name, v in self._stats.items()})
        return out

    def __repr__(self) -> str:
        body = ", ".join(f"{n}={float(t.value.detach()):.4g}x{t.weight:g}" for n, t in self._terms.items())
        return f"LossTerms({body})"


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """Cross-entropy of ``logits [B, S, V]`` against ``labels [B, S]`` (already aligned: position t
    predicts ``labels[:, t]``; ``IGNORE_INDEX`` positions skipped), summed and times ``scale``."""
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return ce * scale


def mtp_loss(mtp_logits: Sequence[torch.Tensor], labels: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean over MTP depths of the summed cross-entropy, times ``scale``. Depth ``d``'s logits
    ``[B, S-1-d, V]`` predict ``labels[:, 1+d:]`` (one more token ahead per depth)."""
    if not mtp_logits:
        raise ValueError("mtp_loss needs at least one depth of MTP logits (forward with return_mtp=True)")
    total = sum(
        F.cross_entropy(
            ml.flatten(0, 1), labels[:, 1 + d :].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        for d, ml in enumerate(mtp_logits)
    )
    return total * (scale / len(mtp_logits))  # type: ignore[operator]


def lm_terms(
    out: ModelOutput,
    labels: torch.Tensor,
    *,
    lm: bool = True,
    token_scale: float | None = None,
    batch_scale: float = 1.0,
    mtp_weight: float = 0.0,
    aux_weight: float = 0.0,
    indexer_weight: float = 1.0,
) -> LossTerms:
    """The pretraining / SFT terms of one forward (see the module docstring for the scales).

    - ``lm``: False leaves out the language-model terms (``lm``, ``mtp``, ``aux``): the DSA
      warm-up trains the indexers alone.
    - ``token_scale``: multiplies the cross-entropy sums; default ``1 / targets in labels``.
    - ``batch_scale``: multiplies the per-batch means (balance and indexer losses).
    - ``mtp`` is added when ``out.mtp_logits`` holds logits and ``mtp_weight > 0``; ``aux`` when
      the model returned a balance loss (training mode, MoE layers) and ``aux_weight > 0``;
      ``indexer`` when it returned an indexer loss (forward with ``indexer_loss=True``).
    """
    if token_scale is None:
        token_scale = 1.0 / max(1, int((labels != IGNORE_INDEX).sum()))
    terms = LossTerms()
    if lm:
        terms.add("lm", next_token_loss(out.logits, labels, token_scale))
        if out.mtp_logits and mtp_weight > 0:
            terms.add("mtp", mtp_loss(out.mtp_logits, labels, token_scale), mtp_weight)
        if out.aux_loss is not None and aux_weight > 0:
            terms.add("aux", out.aux_loss * batch_scale, aux_weight)
    if out.indexer_loss is not None:
        terms.add("indexer", out.indexer_loss * batch_scale, indexer_weight)
    return terms


__all__ = ["LossTerm", "LossTerms", "lm_terms", "mtp_loss", "next_token_loss"]
