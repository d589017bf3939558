"""The DSA dispatch point: lightning-indexer scores, top-k selection, sparse MLA
attention and the indexer distillation loss.

Every op has a pure-torch reference here that always works (CPU, any dtype) and
is the ground truth the Triton kernels in ``dsv.kernels`` are tested against.
The public functions (``indexer_scores``, ``select_topk``, ``sparse_mla``,
``indexer_kl_loss``) route to the kernels when they are installed and usable, and
to the reference otherwise. ``DSV_KERNELS=torch|triton`` forces a choice
(``triton`` on CPU needs ``TRITON_INTERPRET=1``). ``dsv.kernels`` is imported
lazily, on first use, so core never depends on it at import time.

``fused_sparse_attention`` is the three DSA ops in one call; at inference on a CPU
it runs as dsv-kernels' compiled CPU kernel (one pass per query instead of about
25 torch ops per layer), elsewhere as the chain of the three.

Shapes follow the absorbed ("MQA mode") MLA form that DSA is built on:

- indexer: ``q [B, S, H_I, D_I]``, shared keys ``k [B, T, D_I]``, head weights
  ``w [B, S, H_I]`` (all scales already folded in) ->
  ``I[b, t, s] = sum_h w[b,t,h] * relu(q[b,t,h] . k[b,s])``, fp32, ``-inf`` where
  key ``s`` is in the future of query ``t`` (query ``t`` sits at absolute position
  ``q_offset[b] + t``).
- selection: ``idx [B, S, K]`` int32 with ``K = min(index_topk, T)``; ``-1`` marks
  an entry that selected a masked (future / padded) key.
- sparse attention: ``q [B, S, H, D_qk]`` (latent query ``kv_lora_rank`` + rope
  dims), one latent row per key ``kv [B, T, D_qk]`` shared by all heads, values
  are ``kv[..., :d_v]``; returns ``out [B, S, H, d_v]`` and the natural-log
  log-sum-exp ``lse [B, S, H]`` (fp32).

Run the checks: ``pytest packages/core/tests/test_attention.py``.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:
    from dsv.core.cache import PagedRows

Backend = Literal["torch", "triton"]

# Queries per chunk in the reference paths: keeps the gathered [chunk, K, D] block bounded
# so long sequences run on a laptop without materialising [S, K, D] at once.
_REF_CHUNK_ELEMS = 1 << 26
_INDEXER_CHUNK_ELEMS = 1 << 19  # 2 MiB fp32 blocks: 4-10% faster than 4 MiB on prefill chunks


# ----------------------------------------------------------------------------- dispatch


def _usable(name: str) -> tuple[ModuleType | None, str]:
    """``name`` (dsv.kernels or dsv.kernels.cpu) when importable and its ``availability()`` says yes."""
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        return None, f"dsv-kernels not importable ({exc})"
    usable, why = module.availability()
    return (module if usable else None), why


def _kernels_module() -> tuple[ModuleType | None, str]:
    # Whether the Triton kernels run here depends on TRITON_INTERPRET (the CPU interpreter), which a
    # process may set and unset: the answer is kept per value of it, so a lookup made without the
    # interpreter is not reused with it (or the other way round).
    return _kernels_module_for(os.environ.get("TRITON_INTERPRET", ""))


@functools.lru_cache(maxsize=4)
def _kernels_module_for(interpret: str) -> tuple[ModuleType | None, str]:
    return _usable("dsv.kernels")


def backend_for(t: torch.Tensor) -> Backend:
    """Which implementation handles tensors like ``t``: forced by ``DSV_KERNELS``, else triton on CUDA
    when dsv-kernels is installed and usable, else torch."""
    forced = os.environ.get("DSV_KERNELS", "").strip().lower()
    if forced not in ("", "auto", "torch", "triton"):
        raise ValueError(f"DSV_KERNELS={forced!r} is not one of: torch, triton, auto")
    if forced == "torch":
        return "torch"
    kernels, why = _kernels_module()
    if forced == "triton":
        if kernels is None:
            raise RuntimeError(f"DSV_KERNELS=triton but the Triton kernels are not usable: {why}")
        return "triton"
    return "triton" if (kernels is not None and t.is_cuda) else "torch"


def _kernels() -> ModuleType:
    kernels, why = _kernels_module()
    assert kernels is not None, why
    return kernels


@functools.lru_cache(maxsize=1)
def _cpu_kernels_module() -> tuple[ModuleType | None, str]:
    return _usable("dsv.kernels.cpu")


def prepare_cpu_kernel() -> tuple[bool, str]:
    """Build (or load from its cache) dsv-kernels' CPU kernel now instead of on the first forward
    that needs it; whether it is usable here, and why."""
    cpu, why = _cpu_kernels_module()
    return cpu is not None, why


def fused_sparse_ok(q: torch.Tensor, kv: torch.Tensor) -> bool:
    """Whether :func:`fused_sparse_attention` runs as one compiled CPU call for tensors like these:
    fp32 CPU tensors at inference, dsv-kernels' CPU kernel built, and ``DSV_KERNELS`` not forcing
    the torch references (or Triton)."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and kv.dtype == torch.float32
        and not (torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad))
        and os.environ.get("DSV_KERNELS", "").strip().lower() in ("", "auto")
        and _cpu_kernels_module()[0] is not None
    )


# ----------------------------------------------------------------------------- masks


def _query_positions(
    q_offset: torch.Tensor | int, s_q: int, batch: int, device: torch.device
) -> torch.Tensor:
    """Absolute position of every query, ``[B, S, 1]``: ``q_offset[b] + t``."""
    if isinstance(q_offset, int):
        q_offset = torch.full((batch,), q_offset, dtype=torch.long, device=device)
    return q_offset.to(device).view(-1, 1, 1) + torch.arange(s_q, device=device).view(1, -1, 1)


def causal_key_mask(
    q_offset: torch.Tensor | int, s_q: int, s_k: int, batch: int, device: torch.device
) -> torch.Tensor:
    """Bool ``[B, S, T]``: True where key ``s`` is visible to query ``t`` (``s <= q_offset[b] + t``)."""
    return torch.arange(s_k, device=device).view(1, 1, -1) <= _query_positions(q_offset, s_q, batch, device)


def _future_keys(
    q_offset: torch.Tensor | int, s_q: int, s_k: int, batch: int, device: torch.device
) -> torch.Tensor:
    """Bool ``[B, S, T]``: the complement of :func:`causal_key_mask`, built without the negation."""
    return torch.arange(s_k, device=device).view(1, 1, -1) > _query_positions(q_offset, s_q, batch, device)


# ----------------------------------------------------------------------------- references


def indexer_scores_reference(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, q_offset: torch.Tensor | int = 0
) -> torch.Tensor:
    """``I[b,t,s] = sum_h w[b,t,h] * relu(q[b,t,h] . k[b,s])`` in fp32, ``-inf`` on future keys."""
    B, S, H, D = q.shape
    T = k.shape[1]
    kt = k.float().transpose(1, 2)
    # Queries in chunks whose [B, chunk, H, T] intermediate stays in cache: about 2.5x faster on CPU
    # than one pass that writes, re-reads and reduces the whole [B, S, H, T] block.
    chunk = max(1, _INDEXER_CHUNK_ELEMS // max(1, B * H * T))

    def score(sl: slice) -> torch.Tensor:
        qc = q[:, sl].float()
        n = qc.shape[1]
        scores = torch.bmm(qc.reshape(B, n * H, D), kt).relu_()  # (B, n*H, T)
        # The head-weighted sum as one batched (1 x H) @ (H x T) product per query.
        return torch.bmm(w[:, sl].float().reshape(B * n, 1, H), scores.view(B * n, H, T)).view(B, n, T)

    if chunk >= S:
        index = score(slice(0, S))
    else:
        index = torch.empty(B, S, T, dtype=torch.float32, device=q.device)
        for s0 in range(0, S, chunk):  # differentiable: autograd records the slice writes
            index[:, s0 : s0 + chunk] = score(slice(s0, s0 + chunk))
    return index.masked_fill_(_future_keys(q_offset, S, T, B, q.device), float("-inf"))


def select_topk_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``min(k, T)`` key indices per row of ``scores [B, S, T]`` as int32, in no particular
    order; ``-1`` where the selected score is ``-inf`` (a masked key).

    The selection is unique: higher scores first and, among equal scores, lower key indices first
    (``-0.0`` equals ``0.0``). Every backend (the C kernel, the Triton radix select) picks the same
    keys. A masked key is never picked over a visible one, and every masked pick is ``-1``.
    """
    T = scores.shape[-1]
    k = min(k, T)
    if k in (0, T):  # no key or every key: no choice to make
        values, idx = scores.topk(k, dim=-1, sorted=False)
        return idx.masked_fill(values == float("-inf"), -1).to(torch.int32)
    # torch.topk breaks ties arbitrarily, and with few index heads the relu leaves a quarter to a
    # half of the scores at exactly 0. One extra pick shows where that matters: a row is tied at
    # the boundary when its (k+1)-th largest score equals another pick. Only those rows are redone
    # (a pass over the row); the others drop their (k+1)-th pick. (The selection is a set: every
    # consumer is order-free, and not sorting it is about 12% faster.) Tiny preset, one thread,
    # selection time per forward: 8 index heads 13.4 -> 14.7 ms in a 4 x 512 prefill, 0.38 -> 0.48
    # ms in a 32-row decode step; 1 head (a query whose weight is negative ties at 0, so half the
    # rows are redone) 10.9 -> 20.2 ms and 0.33 -> 0.73 ms.
    values, idx = scores.topk(k + 1, dim=-1, sorted=False)
    boundary, last = values.min(dim=-1, keepdim=True)  # the (k+1)-th largest and where it is
    picked = idx.masked_fill(values == float("-inf"), -1)
    # Overwrite the (k+1)-th pick with the final column, then drop the final column.
    picked = picked.scatter(-1, last, picked[..., k:])[..., :k].to(torch.int32)
    tied = (values == boundary).sum(-1) > 1
    if bool(tied.any()):  # (a host sync on CUDA; the model's forward already makes one per layer)
        # Rows tied at -inf see at most k keys: all of them are picked, the rest are -1 anyway.
        tied &= boundary.squeeze(-1) > float("-inf")
        rows = tied.flatten().nonzero().squeeze(1)
        if rows.numel():
            at = boundary.view(-1, 1)[rows]
            need = k - (values.view(-1, k + 1)[rows] > at).sum(-1, keepdim=True, dtype=torch.int32)
            picked.view(-1, k)[rows] = _lowest_index_ties(scores.reshape(-1, T)[rows], at, need)
    return picked


def _lowest_index_ties(scores: torch.Tensor, boundary: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
    """Rows ``scores [R, T]``: every key above ``boundary [R, 1]`` and the ``need [R, 1]`` lowest-index
    keys equal to it, ascending, int32 ``[R, K]`` (the counts must add up to the same K in each row)."""
    equal = scores == boundary
    # (a running count and a nonzero: about 0.6x the cost of a second top-k over a tie-free key)
    take = (equal.cumsum(-1, dtype=torch.int32) <= need).logical_and_(equal).logical_or_(scores > boundary)
    return take.nonzero()[:, 1].view(scores.shape[0], -1).to(torch.int32)


def sparse_mla_reference(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sm_scale: float, d_v: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over only its selected latent rows; see the module docstring.

    Rows whose selection is all ``-1`` produce zeros and ``lse = -inf``. Differentiable in ``q`` and
    ``kv`` through autograd (the gather's backward is a scatter-add).
    """
    B, S, H, D = q.shape
    K = idx.shape[-1]
    chunk = max(1, _REF_CHUNK_ELEMS // max(1, K * D * max(1, B)))
    outs, lses = [], []
    for s0 in range(0, S, chunk):
        sl = slice(s0, min(S, s0 + chunk))
        ids = idx[:, sl].long()  # (B, s, K)
        valid = ids >= 0
        gathered = _gather_rows(kv, ids)  # (B, s, K, D)
        logits = torch.einsum("bshd,bskd->bshk", q[:, sl].float(), gathered.float()) * sm_scale
        logits = logits.masked_fill(~valid.unsqueeze(2), float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)  # (B, s, H)
        probs = torch.exp(logits - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min))
        probs = torch.nan_to_num(probs, nan=0.0)
        out = torch.einsum("bshk,bskd->bshd", probs, gathered[..., :d_v].float())
        outs.append(out.to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)


def _gather_rows(kv: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``kv [B, T, D]`` rows at ``idx [B, S, K]`` (``-1`` read as row 0; mask separately) -> ``[B, S, K, D]``."""
    B, S, K = idx.shape
    T, D = kv.shape[1:]
    ids = idx.long().clamp_min(0)
    if kv.stride(2) == 1 and kv.stride(1) == D and kv.stride(0) % D == 0:
        # Whole-row copies out of one flat [rows, D] view of the storage: about 2x faster than an
        # element-wise gather on CPU. For a view into a larger cache buffer (the decode staging rows)
        # row b starts stride(0) / D rows after row b-1; nothing is copied to build the flat view.
        per_b = kv.stride(0) // D
        # (reshape when contiguous: its backward is a plain view, as_strided's is not)
        flat = kv.reshape(B * T, D) if per_b == T else kv.as_strided(((B - 1) * per_b + T, D), (D, 1))
        rows = ids + (torch.arange(B, device=idx.device) * per_b).view(B, 1, 1)
        return flat.index_select(0, rows.flatten()).view(B, S, K, D)
    return kv[torch.arange(B, device=idx.device).view(B, 1, 1), ids]


def attention_probs_summed_reference(
    q: torch.Tensor,
    kv: torch.Tensor,
    sm_scale: float,
    q_offset: torch.Tensor | int = 0,
    idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Main-attention probabilities summed over heads and L1-normalised: the indexer's target.

    Without ``idx`` (dense warm-up, V3.2-Exp §2.1) the main attention is dense: ``p [B, S, T]`` over
    every visible key. With ``idx`` (sparse stage) the main attention itself only sees the selected
    keys, so each head's softmax runs over the selection: ``p [B, S, K]`` aligned with ``idx``
    (0 at ``-1`` entries). No gradient flows into the target.
    """
    with torch.no_grad():
        B, S, H, D = q.shape
        if idx is None:
            T = kv.shape[1]
            logits = torch.einsum("bshd,btd->bsht", q.float(), kv.float()) * sm_scale
            visible = causal_key_mask(q_offset, S, T, B, q.device)
            logits = logits.masked_fill(~visible.unsqueeze(2), float("-inf"))
        else:
            logits = torch.einsum("bshd,bskd->bshk", q.float(), _gather_rows(kv, idx).float()) * sm_scale
            logits = logits.masked_fill(~(idx >= 0).unsqueeze(2), float("-inf"))
        p = torch.nan_to_num(logits.softmax(dim=-1), nan=0.0).sum(dim=2)  # (B, S, T or K)
        return p / p.sum(-1, keepdim=True).clamp_min(1e-20)


def indexer_kl_loss_reference(
    q: torch.Tensor,
    kv: torch.Tensor,
    index_scores: torch.Tensor,
    sm_scale: float,
    idx: torch.Tensor | None = None,
    q_offset: torch.Tensor | int = 0,
    eps: float = 1e-10,
) -> torch.Tensor:
    """Indexer distillation loss, mean over query tokens of ``KL(p_t || softmax(I_t))``.

    ``p_t`` is :func:`attention_probs_summed_reference` (computed from the absorbed ``q``/``kv``
    without gradient). With ``idx`` (the sparse stage) both distributions live on the selected set:
    ``p`` from the sparse main attention, ``softmax`` over the selected scores; ``-1`` entries are
    ignored. Only ``index_scores`` receives gradient.
    """
    p = attention_probs_summed_reference(q, kv, sm_scale, q_offset, idx)
    scores = index_scores.float()
    if idx is not None:
        scores = torch.gather(scores, -1, idx.long().clamp_min(0)).masked_fill(idx < 0, float("-inf"))
    log_q = torch.log_softmax(scores, dim=-1)
    log_q = torch.where(p > 0, log_q, torch.zeros_like(log_q))
    kl = (p * (torch.log(p + eps) - log_q)).sum(-1)  # (B, S)
    return kl.mean()


# ----------------------------------------------------------------------------- public ops


def indexer_scores(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, q_offset: torch.Tensor | int = 0
) -> torch.Tensor:
    """Lightning-indexer scores ``[B, S, T]`` (fp32, ``-inf`` on future keys); kernels when usable."""
    if backend_for(q) == "triton":
        return _kernels().indexer_scores(q, k, w, q_offset=q_offset)
    return indexer_scores_reference(q, k, w, q_offset)


def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``min(k, T)`` indices per row, int32, ``-1`` for masked picks; kernels when usable."""
    if backend_for(scores) == "triton":
        return _kernels().topk(scores, k)
    return select_topk_reference(scores, k)


# On the torch path, attending densely with everything outside the selection masked out is the same
# maths as gathering the selected rows, and cheaper until the context is several times the selection
# (gathers are memory-bound on CPU, the fused SDPA kernel is not). V3.2-Exp likewise simulates DSA
# with a masked dense attention for short prefill. Measured on the tiny preset (top-k 32, one CPU
# thread):
# - with autograd (training), against the gather-einsum reference: a 256-token chunk runs about
#   1.6x faster masked at 256 keys and still faster at 512, hence 16;
# - at inference on CPU, where sparse attention is one fused call (see ``_fused_cpu_ok``): masked
#   and gathered tie at 8x top-k (5.7 vs 6.0 ms, 4 x 256 queries over 256 keys) and gathering wins
#   beyond (3.2 vs 7.2 ms at 512 keys), hence 8; the absorbed form (decode, a few queries per row)
#   always gathers (106 vs 578 us, 32 rows over 512 keys).
MASKED_DENSE_MAX_RATIO = 16
MASKED_DENSE_MAX_RATIO_FUSED = 8


def selection_mask(idx: torch.Tensor, s_k: int) -> torch.Tensor:
    """Bool ``[B, S, s_k]``: True at the keys ``idx [B, S, K]`` selects (``-1`` entries select nothing)."""
    B, S, _ = idx.shape
    ids = torch.where(idx >= 0, idx.long(), torch.full_like(idx, s_k, dtype=torch.long))
    allowed = torch.zeros(B, S, s_k + 1, dtype=torch.bool, device=idx.device)
    return allowed.scatter_(2, ids, True)[..., :s_k]


def prefers_masked_dense(t: torch.Tensor, s_k: int, k: int, *, absorbed: bool = False) -> bool:
    """Whether a selection of ``k`` of ``s_k`` keys is better computed as masked dense attention.

    ``t`` is the query; ``absorbed``: the layer attends in the absorbed (MQA) form.
    """
    if backend_for(t) != "torch":
        return False
    if _fused_cpu_ok(t, t):
        return not absorbed and s_k <= MASKED_DENSE_MAX_RATIO_FUSED * k
    return s_k <= MASKED_DENSE_MAX_RATIO * k


def sparse_mla(
    q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sm_scale: float, d_v: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MLA attention over selected latent rows -> ``(out [B,S,H,d_v], lse [B,S,H])``."""
    if backend_for(q) == "triton":
        return _kernels().sparse_mla(q, kv, idx, sm_scale=sm_scale, d_v=d_v)
    if _fused_cpu_ok(q, kv):
        B, S, H, D = q.shape
        K = idx.shape[-1]
        rows = _gather_rows(kv, idx).view(B * S, 1, K, D)
        out, lse = _attend_fused(q.reshape(B * S, 1, H, D), rows, (idx >= 0).view(B * S, 1, 1, K), sm_scale)
        return out[..., :d_v].reshape(B, S, H, d_v).to(q.dtype), lse.view(B, S, H)
    return sparse_mla_reference(q, kv, idx, sm_scale, d_v)


def paged_sparse_ok(q: torch.Tensor) -> bool:
    """Whether attention over a paged cache runs as :func:`sparse_mla_paged`: the Triton kernels
    handle tensors like ``q`` (CUDA, or ``DSV_KERNELS=triton``) and nothing needs its gradient."""
    return backend_for(q) == "triton" and not (torch.is_grad_enabled() and q.requires_grad)


def indexer_scores_paged(
    q: torch.Tensor, rows: PagedRows, w: torch.Tensor, q_offset: torch.Tensor | int
) -> torch.Tensor:
    """:func:`indexer_scores` over a paged cache's indexer-key store (``rows.index_k [P, D]``, read
    through ``rows.block_table``) -> ``[B, S, T]`` with ``T = rows.slots.shape[1]``. The Triton kernel
    reads the keys in place where it runs (see :func:`paged_sparse_ok`); elsewhere the keys are gathered."""
    assert rows.index_k is not None, "the paged cache has no indexer keys"
    T = rows.slots.shape[1]
    if backend_for(q) == "triton":
        scores = _kernels().indexer_scores_paged(
            q, rows.index_k, w, rows.block_table, page_size=rows.block_size, q_offset=q_offset
        )
        return scores[..., :T]  # whole blocks: the last one may run past T
    return indexer_scores(q, rows.index_k[rows.slots], w, q_offset)


def sparse_mla_paged(
    q: torch.Tensor, rows: PagedRows, idx: torch.Tensor, sm_scale: float, d_v: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sparse_mla` over a paged cache, reading the selected rows in place.

    ``q [B,S,H,D]``, ``rows`` the layer's latent store and each position's slot, ``idx [B,S,K]``
    selected positions (``-1`` = none) -> ``(out [B,S,H,d_v], lse [B,S,H])``: the same as
    ``sparse_mla(q, rows.kv[rows.slots], idx, ...)`` without gathering ``[B,T,D]``. The Triton varlen
    kernel runs it (see :func:`paged_sparse_ok`); elsewhere the gathered form.
    """
    if backend_for(q) != "triton":
        return sparse_mla(q, rows.kv[rows.slots], idx, sm_scale, d_v)
    B, S, H, D = q.shape
    K = idx.shape[-1]
    flat = rows.slots.gather(1, idx.reshape(B, S * K).long().clamp_min(0)).view(B, S, K)
    flat = torch.where(idx >= 0, flat, -1).to(torch.int32)
    out, lse = _kernels().sparse_mla_varlen(
        q.reshape(B * S, H, D), rows.kv, flat.view(B * S, K), sm_scale=sm_scale, d_v=d_v
    )
    return out.view(B, S, H, d_v), lse.view(B, S, H)


# Heads x latent width up to which the CPU kernel also does the attention (a loop per query row);
# above it the kernel selects and torch's blocked attention attends. Per call, one thread
# (tools/bench/cpu_dsa.py): tiny (4 x 40) decode 0.38 ms whole in C vs 0.47 ms selecting only vs
# 0.67 ms for the torch chain; small (16 x 288) decode 6.8 vs 5.1 vs 6.7 ms; v32 (128 x 576) decode
# 33 vs 16 vs 17 ms.
FUSED_ATTEND_MAX = 1024


def fused_sparse_attention(
    iq: torch.Tensor,
    index_k: torch.Tensor,
    iw: torch.Tensor,
    q_offset: torch.Tensor | int,
    q: torch.Tensor,
    kv: torch.Tensor,
    topk: int,
    sm_scale: float,
    d_v: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indexer scores, top-k and sparse attention in one step -> ``(out, lse, idx)``.

    The same as ``sparse_mla(q, kv, select_topk(indexer_scores(iq, index_k, iw, q_offset), topk),
    sm_scale, d_v)`` with its ``idx``. Where :func:`fused_sparse_ok`, the selection (and, up to
    :data:`FUSED_ATTEND_MAX`, the attention too) is one compiled call; that chain otherwise.
    Inference only on the compiled path (nothing is differentiable through it).
    """
    if fused_sparse_ok(q, kv):
        cpu, _ = _cpu_kernels_module()
        assert cpu is not None
        if q.shape[2] * q.shape[3] <= FUSED_ATTEND_MAX:
            return cpu.sparse_attend(iq, index_k, iw, q_offset, q, kv, topk=topk, sm_scale=sm_scale, d_v=d_v)
        idx = cpu.select(iq, index_k, iw, q_offset, topk=topk)
    else:
        idx = select_topk(indexer_scores(iq, index_k, iw, q_offset), topk)
    out, lse = sparse_mla(q, kv, idx, sm_scale, d_v)
    return out, lse, idx


def dense_mla(
    q: torch.Tensor,
    kv: torch.Tensor,
    sm_scale: float,
    d_v: int,
    q_offset: torch.Tensor | int = 0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense attention in the absorbed (MQA) form (see :func:`dense_mla_reference`); fused on CPU."""
    if not _fused_cpu_ok(q, kv):
        return dense_mla_reference(q, kv, sm_scale, d_v, q_offset, mask)
    B, S, H, D = q.shape
    T = kv.shape[1]
    visible = causal_key_mask(q_offset, S, T, B, q.device) if mask is None else mask  # (B, S, T)
    # Heads are folded into the query axis; every query of row b reads the same latent rows.
    visible = visible.unsqueeze(2).expand(B, S, H, T).reshape(B, 1, S * H, T)
    out, _ = _attend_fused(q.reshape(B, 1, S * H, D), kv.unsqueeze(1), visible, sm_scale)
    return out[..., :d_v].reshape(B, S, H, d_v).to(q.dtype)


def _fused_cpu_ok(q: torch.Tensor, kv: torch.Tensor) -> bool:
    """Inference on CPU: one fused attention call instead of the references' chain of small ops.

    The references stay the training path (autograd through them is what the kernels are tested
    against) and the path everywhere else.
    """
    return (
        q.device.type == "cpu"
        and not (torch.is_grad_enabled() and (q.requires_grad or kv.requires_grad))
        and _FLASH_CPU is not None
    )


# The CPU flash-attention op behind F.scaled_dot_product_attention, called directly because it also
# returns the log-sum-exp (sparse_mla's second output). None if a torch build lacks it.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _attend_fused(
    q: torch.Tensor, k: torch.Tensor, visible: torch.Tensor, sm_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q k^T * scale) k`` for ``q [N, 1, L, D]``, ``k [N, 1, T, D]`` (values are the keys,
    as in absorbed MLA) with bool ``visible`` broadcastable to ``[N, 1, L, T]``.

    Returns the output ``[N, 1, L, D]`` (fp32) and the natural-log log-sum-exp ``[N, 1, L]``; rows
    that see no key get zeros and ``lse = -inf``, as in the references.
    """
    assert _FLASH_CPU is not None
    q, k = q.float(), k.float()
    all_visible = bool(visible.all())
    bias = None if all_visible else torch.zeros(visible.shape).masked_fill_(~visible, float("-inf"))
    out, lse = _FLASH_CPU(q, k, k, 0.0, False, attn_mask=bias, scale=sm_scale)
    if not all_visible:
        lse = lse.masked_fill(~visible.any(-1).expand_as(lse), float("-inf"))
    return out, lse


def indexer_kl_loss(
    q: torch.Tensor,
    kv: torch.Tensor,
    index_scores: torch.Tensor,
    sm_scale: float,
    idx: torch.Tensor | None = None,
    q_offset: torch.Tensor | int = 0,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indexer distillation loss (dense warm-up when ``idx`` is None, sparse stage otherwise).

    ``lse [B, S, H]``: the sparse attention's log-sum-exp over the same selection, when the caller
    has it; the kernel then skips recomputing the target's normaliser (the reference ignores it).
    """
    if backend_for(q) == "triton":
        return _kernels().indexer_kl_loss(
            q, kv, index_scores, sm_scale=sm_scale, idx=idx, q_offset=q_offset, lse=lse
        )
    return indexer_kl_loss_reference(q, kv, index_scores, sm_scale, idx, q_offset)


def dense_mla_reference(
    q: torch.Tensor,
    kv: torch.Tensor,
    sm_scale: float,
    d_v: int,
    q_offset: torch.Tensor | int = 0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense attention in the absorbed (MQA) form over every visible key (or over ``mask [B,S,T]``).

    All heads share the one latent row per key, so heads are folded into the query axis and the
    whole thing is two batched matmuls (no per-head copy of the keys). This is also what sparse
    attention must equal when its selection covers every visible key.
    """
    B, S, H, D = q.shape
    T = kv.shape[1]
    visible = causal_key_mask(q_offset, S, T, B, q.device) if mask is None else mask  # (B, S, T)
    logits = torch.bmm(q.reshape(B, S * H, D).float(), kv.float().transpose(1, 2)) * sm_scale  # (B, S*H, T)
    logits = logits.view(B, S, H, T).masked_fill(~visible.unsqueeze(2), float("-inf"))
    probs = logits.softmax(dim=-1).view(B, S * H, T)
    out = torch.bmm(probs, kv[..., :d_v].float())  # (B, S*H, d_v)
    return out.view(B, S, H, d_v).to(q.dtype)
