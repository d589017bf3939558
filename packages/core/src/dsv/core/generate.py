"""KV-cached sampling: temperature, top-k, top-p, presence/frequency penalties, stop tokens, and
the kept-token masks.

:func:`sample_next` is the one home of the sampling rule (the serve engine and RL rollouts call it
too). It returns, per row, the set of tokens the sampler could have drawn after top-k/top-p
filtering (``kept_mask``): RL's *Keep Sampling Mask* replays exactly that set on the training
forward so the old and new policies share one action space. ``logprobs`` are log-probabilities
under that same sampling distribution (temperature applied, renormalised over the kept set).

``temperature == 0`` is greedy: the kept set is the argmax alone and its logprob is 0.

Presence and frequency penalties are OpenAI's: before sampling, the logit of every token already
generated (the prompt does not count) is lowered by ``frequency_penalty * count + presence_penalty``
(:func:`apply_penalties`); negative values favour repetition instead. :func:`generate` samples
from the penalised logits, so its logprobs are those of the distribution it drew from. A training
forward cannot replay that distribution (it has no penalties), so :func:`generate` refuses
penalties together with ``return_sampling_masks``, the request of an RL rollout whose kept sets
and logprobs the update replays.

Run::

    out = generate(model, tokenizer.encode("hello", add_bos=True), SamplingParams(max_new_tokens=16))
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from dsv.core.cache import DenseKVCache


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings (OpenAI-style names)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI's range, -2..2
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")


@dataclass
class SampleResult:
    tokens: torch.Tensor  # (B,) int64
    logprobs: torch.Tensor  # (B,) fp32, under the sampling distribution
    kept_mask: torch.Tensor  # (B, V) bool, tokens the sampler could draw


def scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` in fp32, shifted so each row's top logit is 0.

    The shift changes no probability, and it keeps tiny temperatures finite: the top logit stays 0
    and the others go to large negatives or ``-inf`` (the greedy limit) instead of overflowing to
    ``inf - inf = nan``. Temperatures below fp32's smallest normal number divide by that number.
    Under autograd (RL's training forward over ``[B, T, V]`` logits) the result is the one new
    tensor and nothing keeps ``logits`` alive: the division is in place (neither op saves its
    output) and the shift is detached (a per-row constant, invisible to any softmax taken after).
    """
    x = logits.float()
    return (x - x.detach().amax(-1, keepdim=True)).div_(max(temperature, torch.finfo(torch.float32).tiny))


def kept_token_mask(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Bool ``[B, V]``: tokens surviving top-k then top-p (nucleus) filtering of ``logits / T``."""
    B, V = logits.shape
    if params.temperature == 0:
        return torch.zeros(B, V, dtype=torch.bool, device=logits.device).scatter_(
            1, logits.argmax(-1, keepdim=True), True
        )
    scaled = scaled_logits(logits, params.temperature)
    keep = torch.ones(B, V, dtype=torch.bool, device=logits.device)
    if 0 < params.top_k < V:
        kth = scaled.topk(params.top_k, dim=-1).values[:, -1:]
        keep &= scaled >= kth
    if params.top_p < 1.0:
        masked = scaled.masked_fill(~keep, float("-inf"))
        probs = masked.softmax(-1)
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        before = sorted_p.cumsum(-1) - sorted_p
        keep_sorted = before < params.top_p
        keep = torch.zeros_like(keep).scatter_(1, order, keep_sorted) & keep
    return keep


def apply_penalties(
    logits: torch.Tensor, counts: Mapping[int, int], presence: float, frequency: float
) -> torch.Tensor:
    """``logits [..., V]`` with ``frequency * counts[j] + presence`` taken off every token ``j`` in
    ``counts`` (how often each was generated so far); a new tensor, or ``logits`` itself when
    nothing applies."""
    if presence == 0 and frequency == 0:
        return logits
    return apply_logit_bias(logits, {j: -(frequency * n + presence) for j, n in counts.items()})


def apply_logit_bias(logits: torch.Tensor, bias: Mapping[int, float]) -> torch.Tensor:
    """``logits [..., V]`` with ``bias[j]`` added to token ``j`` (OpenAI's ``logit_bias``: -100 bans
    a token in practice, +100 forces it); a new tensor, or ``logits`` itself when ``bias`` is empty."""
    if not bias:
        return logits
    ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
    out = logits.clone()
    out[..., ids] += torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return out


def sample_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> SampleResult:
    """Draw one token per row of ``logits [B, V]``."""
    keep = kept_token_mask(logits, params)
    if params.temperature == 0:
        tokens = logits.argmax(-1)
        return SampleResult(
            tokens, torch.zeros(tokens.shape, dtype=torch.float32, device=logits.device), keep
        )
    logp = scaled_logits(logits, params.temperature).masked_fill(~keep, float("-inf")).log_softmax(-1)
    tokens = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    return SampleResult(tokens, logp.gather(1, tokens[:, None]).squeeze(1), keep)


@dataclass
class GenerateOutput:
    tokens: list[int]  # generated ids (the stop token included when one ended generation)
    logprobs: list[float]
    sampling_masks: list[torch.Tensor] | None = None  # per step (V,) bool, on request
    finish_reason: str = "length"  # "stop" | "length"
    routes: list[list[torch.Tensor | None]] | None = field(default=None)  # per step, per layer (on request)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    *,
    return_sampling_masks: bool = False,
    return_routes: bool = False,
    on_token: Callable[[int], None] | None = None,
    use_sparse: bool | None = None,
) -> GenerateOutput:
    """Sample up to ``params.max_new_tokens`` tokens after ``prompt_ids`` with a KV cache.

    ``on_token`` is called with every new id as soon as it is drawn (for streaming).
    ``return_routes`` records the MoE routes of every step (prompt routes first), for Keep Routing.
    ``return_sampling_masks`` records the kept sets (Keep Sampling Mask); it refuses presence and
    frequency penalties, which shift the sampling distribution away from what a training forward
    computes (the masks and logprobs would describe a distribution the update cannot reproduce).
    """
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty: give at least one token (e.g. the BOS id)")
    if return_sampling_masks and (params.presence_penalty != 0 or params.frequency_penalty != 0):
        raise ValueError(
            "return_sampling_masks records a distribution for a training forward to replay, and that "
            "forward has no presence/frequency penalties: set presence_penalty and frequency_penalty "
            "to 0 for replayed rollouts, or do not request the masks"
        )
    config = model.config  # type: ignore[attr-defined]
    if len(prompt_ids) + params.max_new_tokens > config.max_position_embeddings:
        raise ValueError(
            f"prompt ({len(prompt_ids)}) + max_new_tokens ({params.max_new_tokens}) exceeds "
            f"max_position_embeddings ({config.max_position_embeddings})"
        )
    device = model.lm_head.weight.device  # type: ignore[attr-defined]
    dtype = model.lm_head.weight.dtype  # type: ignore[attr-defined]
    cache = DenseKVCache(config, 1, len(prompt_ids) + params.max_new_tokens, device=device, dtype=dtype)
    gen = None
    if params.seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(params.seed)
    out = GenerateOutput([], [], [] if return_sampling_masks else None, routes=[] if return_routes else None)
    x = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    stops = set(params.stop_token_ids)
    counts: Counter[int] = Counter()
    for _ in range(params.max_new_tokens):
        res = model(x, cache=cache, return_routes=return_routes, use_sparse=use_sparse, logits_to_keep=1)
        if out.routes is not None:
            out.routes.append(res.routes)
        logits = apply_penalties(res.logits[:, -1], counts, params.presence_penalty, params.frequency_penalty)
        s = sample_next(logits, params, gen)
        tok = int(s.tokens[0])
        counts[tok] += 1
        out.tokens.append(tok)
        out.logprobs.append(float(s.logprobs[0]))
        if out.sampling_masks is not None:
            out.sampling_masks.append(s.kept_mask[0].cpu())
        if on_token is not None:
            on_token(tok)
        if tok in stops:
            out.finish_reason = "stop"
            break
        x = s.tokens.view(1, 1)
    return out
