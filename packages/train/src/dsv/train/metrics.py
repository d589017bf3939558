"""Evaluation measures used by the stages and the quality benchmark.

- :func:`indexer_recall`: the share of the dense attention mass (summed over heads, L1-normalised,
  as in the warm-up target) that the lightning indexer's top-k set captures, averaged over layers
  and over the queries that see more than ``index_topk`` keys (for the others the selection is
  every key and recall is 1 by construction, so they are left out). :func:`recall_stats` also
  gives the oracle recall, that of the ideal top-k set (the ceiling of any indexer), per layer too,
  and both for the MTP layers, whose indexer selects keys for the MTP block.
- :func:`validation_loss`: mean next-token cross-entropy over target tokens, dense or sparse.
- :func:`passkey_accuracy`: greedy retrieval of a 5-digit pass key hidden at a random depth in
  filler text that, with the answer, fills ``context_tokens`` (needle in a haystack);
  :func:`passkey_scores` adds first-token and per-token accuracy, which show partial retrieval.

Run the checks: ``pytest packages/train/tests/test_train_metrics.py``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dsv.core.attention import attention_probs_summed_reference
from dsv.core.model.rope import Rotary
from dsv.train.data import IGNORE_INDEX, passkey_document


def _absorbed_q_and_latent(mla: Any, x: torch.Tensor, rope: Rotary) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute one MLA layer's absorbed queries ``[B,S,H,r+rope]`` and latent rows ``[B,S,r+rope]``."""
    B, S, _ = x.shape
    q = mla.q_b_proj(mla.q_a_layernorm(mla.q_a_proj(x))).view(B, S, mla.n_heads, mla.nope + mla.rope)
    q_nope, q_pe = q[..., : mla.nope], rope.interleaved(q[..., mla.nope :])
    kv = mla.kv_a_proj_with_mqa(x)
    latent = torch.cat(
        (mla.kv_a_layernorm(kv[..., : mla.rank]), rope.interleaved(kv[..., mla.rank :])), -1
    )
    return mla._absorbed_query(q_nope, q_pe), latent


@dataclass(frozen=True)
class RecallStats:
    """Top-k recall of one model on some rows (see :func:`recall_stats`).

    ``indexer``: mean dense-attention mass inside the lightning indexer's top-k set. ``oracle``: the
    same for the ideal set, the top-k keys of the true head-summed attention of each query: the most
    any top-k selection can capture, so ``indexer / oracle`` is how close the indexer gets to the best
    possible. ``per_layer``: ``(indexer, oracle)`` of each main layer (the two means are over these).
    ``mtp``: ``(indexer, oracle)`` of each MTP depth, whose indexer selects keys for the MTP block
    (empty for a model without MTP layers or rows too short for them to select).
    """

    indexer: float
    oracle: float
    per_layer: tuple[tuple[float, float], ...]
    mtp: tuple[tuple[float, float], ...] = ()

    @property
    def ratio(self) -> float:
        """The indexer's recall as a fraction of the oracle's."""
        return self.indexer / self.oracle if self.oracle > 0 else float("nan")

    @property
    def mtp_indexer(self) -> float | None:
        """Mean indexer recall of the MTP depths (None without any)."""
        return sum(a for a, _ in self.mtp) / len(self.mtp) if self.mtp else None


@torch.no_grad()
def recall_stats(model: Any, input_ids: torch.Tensor, batch_size: int = 4) -> RecallStats:
    """Indexer and oracle top-k recall of every main layer and every MTP depth, from one dense
    forward pass per batch (with the MTP layers).

    Only queries that see more than ``index_topk`` keys count (see the module docstring); main layers
    are weighted equally in ``indexer`` and ``oracle``. MTP depth ``d`` sees ``S - 1 - d`` positions.
    """
    if not model.config.has_indexer:
        raise ValueError("indexer recall needs a deepseek_v32 model (it has no indexer)")
    topk = model.config.index_topk
    S = input_ids.shape[1]
    if topk >= S:
        raise ValueError(
            f"recall needs sequences longer than index_topk={topk} (got {S}): every key is selected"
        )
    main = list(model.blocks)
    # MTP depth d attends over S - 1 - d positions: it selects only when that exceeds top-k.
    mtp = [m for d, m in enumerate(model.mtp_layers) if S - 1 - d > topk]
    layers = main + mtp
    captured: dict[int, tuple[Any, ...]] = {}
    hooks = []
    for i, layer in enumerate(layers):

        def grab(_mod: Any, args: tuple[Any, ...], i: int = i) -> None:
            captured[i] = args[:2]

        hooks.append(layer.self_attn.register_forward_pre_hook(grab))
    sums = torch.zeros(len(layers), 2, dtype=torch.float64)  # per layer: indexer mass, oracle mass
    counts = torch.zeros(len(layers), dtype=torch.float64)
    try:
        for b0 in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[b0 : b0 + batch_size].to(model.lm_head.weight.device)
            out = model(ids, use_sparse=False, return_indices=True, return_mtp=bool(mtp))
            selections = list(out.indices) + list(out.mtp_indices or [])[: len(mtp)]
            for i, layer in enumerate(layers):
                x, rope = captured[i]
                q_abs, latent = _absorbed_q_and_latent(layer.self_attn, x, rope)
                p = attention_probs_summed_reference(q_abs, latent, layer.self_attn.scale)  # (B, S', T)
                idx = selections[i].long()
                mass = torch.gather(p, -1, idx.clamp_min(0)).masked_fill(idx < 0, 0.0).sum(-1)  # (B, S')
                best = p.topk(topk, dim=-1).values.sum(-1)  # (B, S'): the ideal selection
                # queries that see more than top-k keys
                sums[i, 0] += float(mass[:, topk:].sum())
                sums[i, 1] += float(best[:, topk:].sum())
                counts[i] += ids.shape[0] * (p.shape[1] - topk)
    finally:
        for h in hooks:
            h.remove()
    per = sums / counts.clamp_min(1).unsqueeze(1)
    mean = per[: len(main)].mean(0)
    return RecallStats(
        indexer=float(mean[0]),
        oracle=float(mean[1]),
        per_layer=tuple((float(a), float(b)) for a, b in per[: len(main)].tolist()),
        mtp=tuple((float(a), float(b)) for a, b in per[len(main) :].tolist()),
    )


def indexer_recall(model: Any, input_ids: torch.Tensor, batch_size: int = 4) -> float:
    """Mean dense-attention mass inside the indexer's top-k set (see the module docstring)."""
    return recall_stats(model, input_ids, batch_size).indexer


@torch.no_grad()
def validation_loss(
    model: Any, input_ids: torch.Tensor, labels: torch.Tensor, *, use_sparse: bool, batch_size: int = 8
) -> float:
    """Mean cross-entropy over target tokens of ``(input_ids, labels)`` rows."""
    device = model.lm_head.weight.device
    total, n = 0.0, 0
    for b0 in range(0, input_ids.shape[0], batch_size):
        ids, lab = input_ids[b0 : b0 + batch_size].to(device), labels[b0 : b0 + batch_size].to(device)
        logits = model(ids, use_sparse=use_sparse).logits
        total += float(
            F.cross_entropy(logits.flatten(0, 1), lab.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        )
        n += int((lab != IGNORE_INDEX).sum())
    return total / max(1, n)


def passkey_filler_for(
    tokenizer: Any, context_tokens: int, *, seed: int = 1234, distinct: int | None = None
) -> int:
    """The most filler sentences a :func:`~dsv.train.data.passkey_document` can have while BOS,
    prompt and answer stay within ``context_tokens`` (measured on the document drawn with ``seed``;
    sentences vary little in token count)."""

    def length(n_filler: int) -> int:
        prompt, answer, _ = passkey_document(random.Random(seed), n_filler, distinct=distinct)
        return 1 + len(tokenizer.encode(prompt)) + len(tokenizer.encode(answer))

    if length(0) > context_tokens:
        raise ValueError(f"a pass-key prompt without filler is longer than {context_tokens} tokens")
    filler = 0
    while length(filler + 1) <= context_tokens:
        filler += 1
    return filler


@dataclass(frozen=True)
class PasskeyScores:
    """Pass-key retrieval measured three ways over the same prompts (see :func:`passkey_scores`).

    ``exact``: greedy decoding reproduces the whole key. ``first_token``: the key's first token is the
    top prediction after the prompt (the model found the needle). ``token``: share of the key's tokens
    that are the top prediction given the key's earlier tokens (teacher forcing).
    """

    exact: float
    first_token: float
    token: float


def _passkey_prompts(
    tokenizer: Any, context_tokens: int, n: int, seed: int, distinct: int | None = None
) -> list[tuple[list[int], list[int], str]]:
    """``n`` prompts as ``(BOS + prompt ids, key token ids, key)``, each fitting ``context_tokens``
    together with its answer."""
    rng = random.Random(seed)
    filler = passkey_filler_for(tokenizer, context_tokens, seed=seed, distinct=distinct)
    prompts = []
    for _ in range(n):
        prompt, answer, _ = passkey_document(rng, filler, distinct=distinct)
        key = answer.strip(" .")
        ans_ids = tokenizer.encode(answer)
        key_ids = tokenizer.encode(" " + key)
        if ans_ids[: len(key_ids)] != key_ids:  # the "." merged into the key's last token
            key_ids = ans_ids[:-1] if len(ans_ids) > 1 else ans_ids
        prompts.append(([tokenizer.bos_id, *tokenizer.encode(prompt)], key_ids, key))
    return prompts


@torch.no_grad()
def passkey_scores(
    model: Any,
    tokenizer: Any,
    *,
    context_tokens: int,
    n: int = 32,
    seed: int = 1234,
    use_sparse: bool,
    max_new_tokens: int = 4,
    distinct: int | None = None,
) -> PasskeyScores:
    """Exact-match, first-token and per-token pass-key accuracy over the prompts of
    :func:`passkey_accuracy` (same ``seed`` and ``distinct``, same prompts)."""
    device = model.lm_head.weight.device
    exact = first = tok_hits = tok_total = 0
    for ids, key_ids, key in _passkey_prompts(tokenizer, context_tokens, n, seed, distinct):
        logits = model(torch.tensor([ids + key_ids], device=device), use_sparse=use_sparse).logits[0]
        pred = logits[len(ids) - 1 : len(ids) - 1 + len(key_ids)].argmax(-1).tolist()
        first += int(pred[0] == key_ids[0])
        tok_hits += sum(int(a == b) for a, b in zip(pred, key_ids, strict=True))
        tok_total += len(key_ids)
        exact += int(
            _greedy_key(model, tokenizer, ids, max(max_new_tokens, len(key_ids) + 1), use_sparse) == key
        )
    return PasskeyScores(exact=exact / n, first_token=first / n, token=tok_hits / max(1, tok_total))


def _greedy_key(model: Any, tokenizer: Any, ids: list[int], steps: int, use_sparse: bool) -> str | None:
    device = model.lm_head.weight.device
    out: list[int] = []
    for _ in range(steps):
        logits = model(torch.tensor([ids + out], device=device), use_sparse=use_sparse).logits
        out.append(int(logits[0, -1].argmax()))
    got = re.match(r"\s*(\d+)", tokenizer.decode(out))
    return got.group(1) if got is not None else None


@torch.no_grad()
def passkey_accuracy(
    model: Any,
    tokenizer: Any,
    *,
    context_tokens: int,
    n: int = 32,
    seed: int = 1234,
    use_sparse: bool,
    max_new_tokens: int = 4,
    distinct: int | None = None,
) -> float:
    """Share of ``n`` needle documents whose pass key the model reproduces exactly with greedy
    decoding after ``"The pass key is"``.

    Each prompt (BOS, filler sentences with the needle at a random depth, the question) plus its
    answer fits in ``context_tokens``: it has the most filler sentences that still fit."""
    hits = 0
    for ids, key_ids, key in _passkey_prompts(tokenizer, context_tokens, n, seed, distinct):
        hits += int(
            _greedy_key(model, tokenizer, ids, max(max_new_tokens, len(key_ids) + 1), use_sparse) == key
        )
    return hits / n
