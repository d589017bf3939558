"""The GRPO loop (spec §5) on accelerate: rollouts on the dsv Engine, verifiable rewards, the update.

One step:

1. ``prompts`` tasks from :class:`dsv.rl.data.TaskSource` (a pure function of seed and step);
2. G episodes per task on the in-process serve Engine (:func:`dsv.rl.rollout.rollout`), recording
   per token log π_old under the sampling distribution, the kept top-k/top-p set and the MoE routes;
3. rewards (:class:`dsv.rl.rewards.RewardSet`: verifier, format, length, user callables) and
   group-relative advantages (``R - mean(R_group)``, optionally divided by the group or batch std);
4. ``ppo_epochs`` optimiser steps on that batch with :func:`dsv.rl.objective.grpo_loss`: the clipped
   ratio (eps_low/eps_high, token or GSPO sequence level), aggregation grpo/dr_grpo/dapo, and the four
   stabilisers, each a switch: unbiased KL (β per family, plain k3 selectable), off-policy sequence
   masking (δ), Keep Routing (the rollout's routes forced in every training forward) and Keep
   Sampling Mask (the rollout's kept sets mask π_θ's logits before the softmax); optionally
   truncated importance sampling against the engine's probabilities;
5. the new weights go into the engine (``Engine.update_weights``), no restart.

The update's forward (:func:`update_batch`, :func:`policy_logits`) runs the prompt a group's G
samples share once, then each sample's own tokens over the prompt's keys (:class:`PrefixCache`, one
graph through both), and the LM head only where a token can be trained; the kept sets travel as
ids per position (:class:`dsv.rl.objective.KeptSets`), never as a ``[B, T, V]`` mask; the free
routes of the route mismatch come from the gates of that same forward
(:func:`dsv.rl.objective.free_routes_of`), not from a second one.

Measured every step: reward and accuracy per family, KL to the reference, clip fraction, the masked
share, the route mismatch of free routing, the rollout-vs-train KL (engine vs trainer logprobs on the
same tokens), response length, rollout and train tokens/s. Written to ``OUT/metrics.jsonl``,
TensorBoard (when installed) and ``OUT/rl.png``.

Checkpoints: ``OUT/checkpoint-NNNNNNN/`` in the Hugging Face layout dsv-train writes (loadable by
``dsv generate`` / ``dsv serve``) plus ``train_state/`` (settings, step, optimiser, RNG), renamed
into place atomically. ``resume=True`` continues from the newest one; rollouts are seeded by
(seed, step), so the continuation is identical to an uninterrupted run. A NaN loss stops the run
before the optimiser step with :class:`RLError`; the last good checkpoint stays.

Library use::

    from dsv.rl import GRPOConfig, grpo
    summary = grpo(GRPOConfig(model="runs/sft/final", tasks=["arithmetic"], out="runs/rl", steps=20))
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import math
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsv.core.checkpoint import atomic_write_bytes, atomic_write_json, load_pretrained, save_pretrained
from dsv.core.errors import DSVError

__all__ = [
    "GRPOConfig", "GRPOSummary", "PrefixCache", "RLError", "UpdateBatch", "evaluate_accuracy", "grpo", "policy_logits",
    "update_batch",
]  # fmt: skip

AGGREGATIONS = ("grpo", "dr_grpo", "dapo")
ADVANTAGE_SCALES = ("none", "group", "batch")
KL_ESTIMATORS = ("unbiased", "k3")
LEVELS = ("token", "sequence")

# Settings that must match for resume to continue the same run.
_RESUME_KEYS = (
    "model", "tasks", "rewards", "steps", "prompts", "group_size", "lr", "weight_decay", "max_grad_norm", "seed",
    "difficulty", "temperature", "top_p", "top_k", "max_tokens", "max_turns", "max_len", "thinking", "beta",
    "family_beta", "kl", "eps_low", "eps_high", "aggregation", "level", "advantage_scale", "opsm_delta",
    "keep_routing", "keep_sampling_mask", "tis_cap", "ppo_epochs",
)  # fmt: skip


class RLError(DSVError):
    """A GRPO run cannot start or continue (bad settings, refused resume, a diverging loss...)."""


@dataclass(kw_only=True)
class GRPOConfig:
    """Settings of one GRPO run (the CLI flags map one-to-one)."""

    model: str  # a checkpoint folder (an SFT'd model)
    out: Path
    tasks: list[str] = field(default_factory=lambda: ["arithmetic"])
    rewards: list[str] = field(default_factory=lambda: ["verifier"])
    steps: int = 100
    prompts: int = 8  # prompts per step (per process)
    group_size: int = 8  # G samples per prompt
    lr: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    difficulty: int = 1
    # rollouts
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 128  # per assistant step
    max_turns: int = 4
    max_len: int = 1024
    thinking: bool = False
    # objective
    beta: float = 0.0  # KL weight to the reference (the initial model); 0 loads no reference
    family_beta: dict[str, float] = field(default_factory=dict)  # β per task family (overrides beta)
    kl: str = "unbiased"  # unbiased (ratio-corrected k3, V3.2) | k3
    eps_low: float = 0.2
    eps_high: float = 0.2
    aggregation: str = "grpo"  # grpo (1/|o_i| per sequence) | dr_grpo (÷ G·max_len) | dapo (÷ all tokens)
    level: str = "token"  # token (GRPO) | sequence (GSPO)
    advantage_scale: str = "none"  # none (V3.2: R - mean) | group (÷ group std) | batch (÷ batch std)
    opsm_delta: float | None = None  # off-policy sequence masking threshold δ; None = off
    keep_routing: bool = True
    keep_sampling_mask: bool = True
    tis_cap: float | None = None  # truncated importance sampling cap C; None = off
    ppo_epochs: int = 1  # optimiser steps per rollout batch
    reward_timeout: float = 10.0
    # run
    holdout: int = 32  # task files: tasks kept out of training, for eval
    eval_every: int = 0  # greedy accuracy on held-out tasks every N steps (0: off)
    eval_tasks: int = 32
    save_every: int = 10
    keep_last: int = 2
    resume: bool = False
    mixed_precision: str | None = None
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True
    library: str | None = None
    engine_blocks: int = 0  # KV blocks of the rollout engine (0: sized for one step's episodes)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        checks = [
            (self.group_size >= 2, f"--group-size must be at least 2 (GRPO compares samples of one prompt), got {self.group_size}"),
            (self.prompts >= 1, f"--prompts must be >= 1, got {self.prompts}"),
            (self.steps >= 1, f"--steps must be >= 1, got {self.steps}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.temperature > 0, f"--temperature must be > 0 for GRPO rollouts (greedy samples are all alike), got {self.temperature}"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"--top-k must be >= 0, got {self.top_k}"),
            (self.max_tokens >= 1 and self.max_turns >= 1, "--max-tokens and --max-turns must be >= 1"),
            (self.beta >= 0 and all(b >= 0 for b in self.family_beta.values()), "--beta and --family-beta must be >= 0"),
            (self.kl in KL_ESTIMATORS, f"--kl must be one of {', '.join(KL_ESTIMATORS)}, got {self.kl!r}"),
            (self.aggregation in AGGREGATIONS, f"--aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}"),
            (self.level in LEVELS, f"--level must be token or sequence (GSPO), got {self.level!r}"),
            (self.advantage_scale in ADVANTAGE_SCALES, f"--advantage-scale must be one of {', '.join(ADVANTAGE_SCALES)}, got {self.advantage_scale!r}"),
            (self.eps_low >= 0 and self.eps_high >= 0, "--eps-low and --eps-high must be >= 0"),
            (self.opsm_delta is None or self.opsm_delta >= 0, "--opsm-delta must be >= 0"),
            (self.tis_cap is None or self.tis_cap > 0, "--tis-cap must be > 0"),
            (self.ppo_epochs >= 1, "--ppo-epochs must be >= 1"),
            (self.reward_timeout > 0, "--reward-timeout must be > 0"),
            (self.mixed_precision in (None, "no", "bf16", "fp16"), "--mixed-precision must be no, bf16 or fp16"),
        ]  # fmt: skip
        for ok, why in checks:
            if not ok:
                raise RLError(why)

    def run_settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _RESUME_KEYS}

    def beta_for(self, family: str) -> float:
        return self.family_beta.get(family, self.beta)

    @property
    def uses_reference(self) -> bool:
        return self.beta > 0 or any(b > 0 for b in self.family_beta.values())


@dataclass
class GRPOSummary:
    """What a finished run reports (also written to ``OUT/summary.json``)."""

    steps: int
    final_dir: str
    seconds: float
    reward: float  # mean reward of the last step
    accuracy: float  # verified share of the last step's samples
    eval_before: float | None = None  # greedy held-out accuracy at the start (eval_every > 0)
    eval_after: float | None = None
    reward_errors: int = 0


# ----------------------------------------------------------------------------- helpers


def _checkpoints(out: Path) -> list[Path]:
    from dsv.train.trainer import list_checkpoints

    return list_checkpoints(out)


def _rng_state() -> bytes:
    from dsv.train.trainer import rng_state

    return rng_state()


def build_engine(model: torch.nn.Module, *, blocks: int, block_size: int = 16) -> Any:
    """An in-process serve Engine on its own copy of ``model``.

    Its thread is not started: ``generate_many`` then drives the iterations in the calling thread,
    so the batches (and the samples) are the same in every run and nothing runs beside the update.
    """
    from dsv.serve.engine import Engine

    shadow = copy.deepcopy(model).eval()
    for p in shadow.parameters():
        p.requires_grad_(False)
    device = next(model.parameters()).device
    engine = Engine.for_model(shadow, model.config, num_blocks=blocks, block_size=block_size, device=device,
                              dtype=next(model.parameters()).dtype)  # fmt: skip
    return engine


@torch.no_grad()
def evaluate_accuracy(engine: Any, tokenizer: Any, source: Any, tasks: list[Any], cfg: GRPOConfig) -> dict[str, float]:
    """Greedy verified accuracy on ``tasks`` (overall and per family), sampled on ``engine``."""
    from dsv.rl.rollout import RolloutSettings, rollout

    settings = RolloutSettings(temperature=0.0, max_tokens=cfg.max_tokens, max_turns=cfg.max_turns,
                               max_len=cfg.max_len, thinking=cfg.thinking)  # fmt: skip
    outs = rollout(engine, tokenizer, tasks, [source.env_for(t) for t in tasks], group_size=1,
                   settings=settings, seed=cfg.seed, step=0)  # fmt: skip
    by_family: dict[str, list[float]] = defaultdict(list)
    for r in outs:
        by_family[r.task.family].append(float(r.score.passed))
    every = [x for xs in by_family.values() for x in xs]
    result = {"accuracy": sum(every) / max(1, len(every))}
    result.update({f"accuracy/{k}": sum(v) / len(v) for k, v in sorted(by_family.items())})
    return result


@dataclass
class UpdateBatch:
    """The rollouts of one step laid out for the update's forward (:func:`update_batch`).

    The G samples of a prompt share their prompt, so the update runs it once per group: ``prefix``
    (``[P, Lp]``, right-padded) holds each group's shared inputs, up to (not including) the input
    that predicts the group's first sampled token; ``inputs`` (``[B, R]``, right-padded) holds the
    rest of each row (``tokens[split_b : -1]``), which attends to its group's prefix through
    :class:`PrefixCache`. Every per-target tensor is ``[B, R]``, aligned with ``inputs``: the
    target of ``inputs[b, t]`` is ``targets[b, t]``. So the layers run ``P·Lp + B·R`` positions
    instead of ``B·T``, and the LM head and the log-softmax only the ``B·R`` that can be trained.
    """

    prefix: torch.Tensor  # (P, Lp) long: each group's shared inputs (Lp may be 0: nothing shared)
    group: torch.Tensor  # (B,) long: the prefix row of each row
    split: torch.Tensor  # (B,) long: where each row's rest starts (its group's prefix length)
    inputs: torch.Tensor  # (B, R) long: the rest of each row's inputs
    targets: torch.Tensor  # (B, R) long
    mask: torch.Tensor  # (B, R) bool: the target is trained (a token the policy sampled)
    old: torch.Tensor  # (B, R) the engine's log-probs under the sampling distribution (π_old)
    lengths: list[int]  # per row: its number of inputs, len(tokens) - 1

    @property
    def T(self) -> int:
        """The longest row's number of inputs."""
        return max(self.lengths)


def update_batch(rollouts: list[Any], device: torch.device) -> UpdateBatch:
    """Lay ``rollouts`` out for the update (:class:`UpdateBatch`): inputs ``tokens[:-1]``, targets
    ``tokens[1:]``; a group's prefix is the longest common start of its rows' inputs that precedes
    every row's first sampled token."""
    B = len(rollouts)
    order: dict[int, int] = {}
    for r in rollouts:
        order.setdefault(r.group, len(order))
    group = [order[r.group] for r in rollouts]
    first = [rows[0] for rows in (
        [b for b in range(B) if group[b] == g] for g in range(len(order))
    )]  # fmt: skip
    shared = [0] * len(order)
    for g, head in enumerate(first):
        members = [rollouts[b] for b in range(B) if group[b] == g]
        # Up to the input before each row's first sampled token, and only while every row agrees.
        n = min(max(0, r.prompt_len - 1) for r in members)
        for r in members[1:]:
            same = 0
            ref = rollouts[head].tokens
            while same < n and r.tokens[same] == ref[same]:
                same += 1
            n = same
        shared[g] = n
    split = [shared[g] for g in group]
    lengths = [len(r.tokens) - 1 for r in rollouts]
    R = max(max(1, n - s) for n, s in zip(lengths, split, strict=True))
    Lp = max(shared)
    prefix = torch.zeros(len(order), Lp, dtype=torch.long)
    for g, head in enumerate(first):
        prefix[g, : shared[g]] = torch.tensor(rollouts[head].tokens[: shared[g]], dtype=torch.long)
    inputs = torch.zeros(B, R, dtype=torch.long)
    targets = torch.zeros(B, R, dtype=torch.long)
    mask = torch.zeros(B, R, dtype=torch.bool)
    old = torch.zeros(B, R)
    for b, r in enumerate(rollouts):
        s, n = split[b], lengths[b] - split[b]
        if n > 0:
            inputs[b, :n] = torch.tensor(r.tokens[s:-1])
            targets[b, :n] = torch.tensor(r.tokens[s + 1 :])
            mask[b, :n] = torch.tensor(r.trained[s + 1 :], dtype=torch.bool)
            old[b, :n] = torch.tensor(r.sample_logprobs[s + 1 :])
    return UpdateBatch(
        prefix=prefix.to(device), group=torch.tensor(group, device=device), split=torch.tensor(split, device=device),
        inputs=inputs.to(device), targets=targets.to(device), mask=mask.to(device), old=old.to(device), lengths=lengths,
    )  # fmt: skip


class PrefixCache:
    """A :class:`dsv.core.cache.KVCache` that keeps the graph: the update's two forwards share it.

    First the prefix forward (``[P, Lp]`` at offset 0) stores each layer's latent rows and indexer
    keys as computed (with their graph); :meth:`attach` then points each of the ``B`` rows at its
    group's prefix, and the rest forward (``[B, R]`` at offsets ``split``) reads, per row, the
    prefix's keys before ``split[b]`` and its own after. The causal rule of every cache (key ``s``
    visible to query ``t`` of row ``b`` only when ``s <= split[b] + t``) hides the prefix padding of
    shorter groups and the rest padding of shorter rows. Gradients reach the prefix's positions
    through every row that attended to them, summed over the group.
    """

    def __init__(self, rows: int, device: torch.device) -> None:
        self._offsets = torch.zeros(rows, dtype=torch.long, device=device)
        self._prefix: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._group: torch.Tensor | None = None

    def attach(self, group: torch.Tensor, split: torch.Tensor) -> None:
        """Switch from storing the prefix to serving rows ``b`` from prefix row ``group[b]``."""
        self._group = group
        self._offsets = split.clone()

    def offsets(self) -> torch.Tensor:
        return self._offsets

    def update(
        self, layer: int, kv: torch.Tensor, index_k: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._group is None:
            self._prefix[layer] = (kv, index_k)
            return kv, index_k
        kv_p, ik_p = self._prefix[layer]
        return self._place(kv_p, kv), (None if index_k is None or ik_p is None else self._place(ik_p, index_k))

    def _place(self, prefix: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        assert self._group is not None
        B, S = new.shape[:2]
        rows = prefix.index_select(0, self._group)  # (B, Lp, D)
        rows = torch.cat((rows, new.new_zeros(B, S, new.shape[-1])), 1)
        pos = self._offsets[:, None] + torch.arange(S, device=new.device)[None]
        return rows.index_put((torch.arange(B, device=new.device)[:, None].expand(B, S), pos), new)

    def advance(self, n: int) -> None:
        if self._group is not None:
            self._offsets = self._offsets + n


def _split_routes(
    routes: list[torch.Tensor | None] | None, batch: UpdateBatch
) -> tuple[list[torch.Tensor | None] | None, list[torch.Tensor | None] | None]:
    """Full-length per-layer routes ``[B, T, k]`` -> the prefix's ``[P, Lp, k]`` (from each group's
    first row) and the rest's ``[B, R, k]`` (padding positions repeat the row's last routes)."""
    if routes is None:
        return None, None
    P, Lp = batch.prefix.shape
    B, R = batch.inputs.shape
    first = torch.zeros(P, dtype=torch.long, device=batch.group.device)
    first.scatter_reduce_(0, batch.group, torch.arange(B, device=batch.group.device), "amin", include_self=False)
    prefix: list[torch.Tensor | None] = []
    rest: list[torch.Tensor | None] = []
    for r in routes:
        if r is None:
            prefix.append(None)
            rest.append(None)
            continue
        prefix.append(r[first, :Lp])
        at = (batch.split.to(r.device)[:, None] + torch.arange(R, device=r.device)[None]).clamp(max=r.shape[1] - 1)
        rest.append(r.gather(1, at[..., None].expand(B, R, r.shape[-1])))
    return prefix, rest


def policy_logits(
    model: torch.nn.Module,
    batch: UpdateBatch,
    forced_routes: list[torch.Tensor | None] | None = None,
    *,
    prefix_model: torch.nn.Module | None = None,
) -> torch.Tensor:
    """``[B, R, V]`` logits of ``batch``'s rest positions: the prefix forward (on ``prefix_model``,
    default ``model``: a DDP wrapper runs one forward per backward, so the caller passes the
    unwrapped module there), then the rest forward on ``model`` over the prefix's keys.
    ``forced_routes``: full-length per-layer ``[B, T, k]`` (Keep Routing), split here."""
    prefix_routes, rest_routes = _split_routes(forced_routes, batch)
    if batch.prefix.shape[1] == 0:
        return model(batch.inputs, forced_routes=rest_routes).logits
    cache = PrefixCache(batch.prefix.shape[0], batch.prefix.device)
    (prefix_model or model)(batch.prefix, cache=cache, forced_routes=prefix_routes, logits_to_keep=1)
    cache.attach(batch.group, batch.split)
    return model(batch.inputs, cache=cache, forced_routes=rest_routes).logits


def _kept_sets(rollouts: list[Any], batch: UpdateBatch, device: torch.device) -> Any:
    """The rollouts' kept sets at the batch's target positions (:class:`KeptSets`); None when the
    rollouts kept every token (no top-k/top-p)."""
    from dsv.rl.objective import KeptSets

    if all(k is None for r in rollouts for k in r.kept):
        return None
    R = batch.inputs.shape[1]
    split = batch.split.tolist()
    return KeptSets.from_ids([r.kept[1 + s : 1 + s + R] for r, s in zip(rollouts, split, strict=True)], R, device)


def _forced_routes(rollouts: list[Any], T: int, device: torch.device) -> list[torch.Tensor | None] | None:
    """Per layer ``[B, T, k]`` expert ids from the rollouts (Keep Routing); padding repeats expert 0."""
    from dsv.rl.objective import forced_routes_batch

    if any(r.routes is None for r in rollouts):
        return None
    routes = forced_routes_batch([r.routes for r in rollouts], [len(r.tokens) - 1 for r in rollouts], T)
    return [None if x is None else x.to(device) for x in routes]


# ----------------------------------------------------------------------------- the run


def grpo(cfg: GRPOConfig, *, on_step: Callable[[dict[str, Any]], None] | None = None) -> GRPOSummary:
    """Run GRPO as configured; returns the summary (see the module docstring)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from dsv.rl.data import TaskSource
    from dsv.rl.objective import (
        free_routes_of,
        group_advantages,
        grpo_loss,
        route_mismatch,
        sampling_logprobs,
    )
    from dsv.rl.rewards import RewardInput, RewardSet
    from dsv.rl.rollout import RolloutSettings, rollout
    from dsv.train.trainer import StepProgress, release_accelerator, set_rng_state

    out = cfg.out
    # Checks that need no model first: a bad reward file or family fails in a second.
    rewards = RewardSet.from_specs(cfg.rewards, timeout=cfg.reward_timeout)
    source = TaskSource(cfg.tasks, seed=cfg.seed, difficulty=cfg.difficulty, holdout=cfg.holdout, library=cfg.library)
    model_dir = Path(cfg.model).expanduser()
    if not (model_dir / "config.json").is_file():
        raise RLError(f"--model {cfg.model!r} is not a checkpoint folder (no config.json); train one with `dsv train sft`")

    log_with: list[str] = []
    if cfg.tensorboard:
        try:
            import tensorboard  # noqa: F401

            log_with = ["tensorboard"]
        except ImportError:
            pass
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision, log_with=log_with or None,
        project_dir=str(out), kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )  # fmt: skip
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index

    ckpts = _checkpoints(out)
    if ckpts and not cfg.resume:
        raise RLError(f"{out} already holds checkpoints (newest {ckpts[-1].name}); pass --resume to continue or choose a new --out")
    resume_from = ckpts[-1] if (cfg.resume and ckpts) else None
    state: dict[str, Any] = {}
    if resume_from is not None:
        state = json.loads((resume_from / "train_state" / "state.json").read_text())
        diffs = [f"{k} (checkpoint {state['settings'].get(k)!r}, now {v!r})" for k, v in cfg.run_settings().items()
                 if state["settings"].get(k) != (list(v) if isinstance(v, tuple) else v)]  # fmt: skip
        if diffs or state.get("world") != world:
            if state.get("world") != world:
                diffs.append(f"processes (checkpoint {state.get('world')}, now {world})")
            raise RLError(f"--resume refused: {resume_from} was written with different settings: {'; '.join(diffs)}")

    device = accelerator.device
    model, tok = load_pretrained(resume_from or model_dir, device=device)
    if tok is None:
        raise RLError(f"{model_dir}: the checkpoint has no tokenizer.json; GRPO needs one")
    ref = None
    if cfg.uses_reference:
        ref, _ = load_pretrained(model_dir, device=device, with_tokenizer=False)
        ref.eval().requires_grad_(False)
    indexer = {id(p) for p in model.indexer_parameters()}
    for p in model.parameters():
        # The indexer learns in the DSA stages, not from the policy gradient (top-k is not differentiable).
        p.requires_grad_(id(p) not in indexer)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), eps=1e-8, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    # DDP expects one forward per backward: the update's prefix forward goes through the module it
    # wraps (its gradients still reach the wrapper's hooks). Other wrappers take both forwards.
    prefix_model = raw if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    start_step = 0
    if resume_from is not None:
        start_step = int(state["step"])
        optimizer.load_state_dict(torch.load(resume_from / "train_state" / "optimizer.pt", weights_only=False))
        set_rng_state((resume_from / "train_state" / f"rng-{rank}.pt").read_bytes())

    per_step = cfg.prompts * cfg.group_size
    blocks = cfg.engine_blocks or per_step * (-(-cfg.max_len // 16)) + 8
    engine = build_engine(raw, blocks=blocks)
    settings = RolloutSettings(
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, max_tokens=cfg.max_tokens,
        max_turns=cfg.max_turns, max_len=min(cfg.max_len, int(raw.config.max_position_embeddings)), thinking=cfg.thinking,
    )  # fmt: skip

    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    history: list[dict[str, Any]] = []
    if main:
        if resume_from is not None and metrics_path.exists():
            kept = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
            history = [m for m in kept if m.get("step", 0) <= start_step]
        atomic_write_bytes(metrics_path, "".join(json.dumps(m) + "\n" for m in history).encode())
        atomic_write_json(out / "rl_config.json", {**dataclasses.asdict(cfg), "out": str(cfg.out)})
    if log_with:
        accelerator.init_trackers("dsv-rl", config={k: str(v) for k, v in cfg.run_settings().items()})

    def save(step: int, name: str) -> Path:
        target = out / name
        extra = {
            "train_state/state.json": (json.dumps({"step": step, "settings": cfg.run_settings(), "world": world}, indent=2) + "\n").encode(),
        }  # fmt: skip
        buf = io.BytesIO()
        torch.save(optimizer.state_dict(), buf)
        extra["train_state/optimizer.pt"] = buf.getvalue()
        # Every process's RNG goes into the folder the main process writes.
        rngs = accelerator.gather_for_metrics([_rng_state()], use_gather_object=True) if world > 1 else [_rng_state()]
        for r, data in enumerate(rngs):
            extra[f"train_state/rng-{r}.pt"] = data
        if main:
            save_pretrained(raw, tok, target, extra_files=extra)
            for old in (_checkpoints(out)[: -cfg.keep_last] if cfg.keep_last > 0 else []):
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return target

    eval_tasks = source.held_out(cfg.eval_tasks) if cfg.eval_every else []
    eval_before = None
    if eval_tasks and start_step == 0:
        eval_before = evaluate_accuracy(engine, tok, source, eval_tasks, cfg)["accuracy"]
        accelerator.print(f"held-out greedy accuracy before: {eval_before:.3f}")

    progress = StepProgress("grpo", cfg.steps, start_step, _PROGRESS_FIELDS, enabled=cfg.progress and main)
    t0 = time.perf_counter()
    record: dict[str, Any] = {}
    reward_errors = 0
    eval_after = None
    try:
        for step in range(start_step, cfg.steps):
            tasks = source.batch(step * world + rank, cfg.prompts)
            t_roll = time.perf_counter()
            rolls = rollout(engine, tok, tasks, [source.env_for(t) for t in tasks], group_size=cfg.group_size,
                            settings=settings, seed=cfg.seed, step=step * world + rank)  # fmt: skip
            t_roll = time.perf_counter() - t_roll
            scored = []
            step_errors = 0
            for r in rolls:
                res = rewards.score(RewardInput(
                    prompt=tok.decode(r.tokens[: r.prompt_len]), completion=r.completion_text,
                    message=r.result.messages[-1] if r.result.messages and r.result.messages[-1].get("role") == "assistant" else {},
                    task=r.task.to_json(), score=r.score, finish_reason=r.finish_reason,
                    completion_tokens=r.completion_tokens, max_tokens=cfg.max_tokens * max(1, r.steps),
                ))  # fmt: skip
                scored.append(res)
                for why in res.errors:
                    step_errors += 1
                    accelerator.print(f"reward: {why}")
            R = torch.tensor([s.total for s in scored], dtype=torch.float32)
            if cfg.advantage_scale == "batch" and world > 1:
                # The batch std over every process's rewards; groups stay local to a process.
                every = accelerator.gather(R.to(device)).cpu()
                adv = group_advantages(R, cfg.group_size, "none")
                adv = adv / (every.std() + 1e-6)
            else:
                adv = group_advantages(R, cfg.group_size, cfg.advantage_scale)
            # Every sample goes into the update (one that sampled nothing has an empty mask), so each
            # process runs the same forwards and backwards.
            batch = rolls
            adv_b = adv.to(device)
            metrics = _step_metrics(rolls, scored, R, cfg)
            metrics["rollout_seconds"] = t_roll
            metrics["reward_errors"] = step_errors
            reward_errors += step_errors
            t_train = time.perf_counter()
            pad = update_batch(batch, device)
            keep = _kept_sets(batch, pad, device) if cfg.keep_sampling_mask else None
            recorded = _forced_routes(batch, pad.T, device)
            forced = recorded if cfg.keep_routing else None
            beta = torch.tensor([cfg.beta_for(r.task.family) for r in batch], device=device)
            ref_logp = None
            if ref is not None:
                with torch.no_grad():
                    ref_logits = policy_logits(ref, pad, forced)
                    ref_logp = sampling_logprobs(ref_logits, pad.targets, cfg.temperature, keep, with_entropy=False).logp
                    del ref_logits
            trainer_old: torch.Tensor | None = None
            entropy: torch.Tensor | None = None
            stepped: set[int] = set()
            for epoch in range(cfg.ppo_epochs):
                # Free routing before the update (the gate's own top-k, same weights as the rollout)
                # against the rollout's routes, what Keep Routing corrects: the gates of the first
                # training forward also report their own choice, so no second forward is run.
                # (Only the rest forward is measured: the prefix positions are never trained.)
                measure = epoch == 0 and recorded is not None
                with free_routes_of(raw) if measure else contextlib.nullcontext() as free:
                    logits = policy_logits(model, pad, forced, prefix_model=prefix_model)
                if measure:
                    metrics["route_mismatch"] = route_mismatch(free, _split_routes(recorded, pad)[1], pad.mask)
                sampled = sampling_logprobs(logits, pad.targets, cfg.temperature, keep, with_entropy=epoch == 0)
                logp = sampled.logp
                del logits
                if epoch == 0:
                    trainer_old = logp.detach()
                    entropy = sampled.entropy
                terms = grpo_loss(
                    logp, trainer_old if cfg.tis_cap is not None else pad.old, adv_b, pad.mask,
                    ref_logp=ref_logp, beta=beta if ref is not None else 0.0, kl=cfg.kl, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                    aggregation=cfg.aggregation, max_len=cfg.max_tokens * cfg.max_turns, level=cfg.level,
                    opsm_delta=cfg.opsm_delta, tis_cap=cfg.tis_cap,
                    behaviour_logp=pad.old if cfg.tis_cap is not None else None,
                )  # fmt: skip
                loss = terms.total()
                # Every process learns of a non-finite loss on any of them, so all stop together.
                bad = torch.tensor([0.0 if bool(torch.isfinite(loss.detach())) else 1.0], device=device)
                if float(accelerator.reduce(bad, reduction="sum")) > 0:
                    _diverged(out, step, f"the loss became {float(loss.detach())}")
                accelerator.backward(loss)
                grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
                optimizer.step()
                if not all(bool(torch.isfinite(p).all()) for p in params):
                    _diverged(out, step, "the weights became non-finite in the update")
                # AdamW skips a parameter without a gradient (the MTP layers, experts no token
                # used): only the others changed and go into the engine.
                stepped.update(id(p) for p in params if p.grad is not None)
                optimizer.zero_grad(set_to_none=True)
                if epoch == 0:
                    metrics.update({f"loss/{k}": v for k, v in terms.metrics().items()})
                    if entropy is not None:
                        metrics["entropy"] = float(entropy[pad.mask].mean()) if pad.mask.any() else 0.0
                    metrics["loss"] = float(loss.detach())
                    if grad_norm is not None:
                        metrics["grad_norm"] = float(grad_norm)
            assert trainer_old is not None
            m = pad.mask
            # Engine vs trainer on the same tokens, both under the sampling distribution.
            diff = (trainer_old - pad.old)[m]
            metrics["rollout_train_kl"] = float((diff.exp() - 1 - diff).mean()) if diff.numel() else 0.0
            metrics["rollout_train_logp_diff"] = float(diff.abs().mean()) if diff.numel() else 0.0
            metrics["train_tokens_per_second"] = int(m.sum()) * cfg.ppo_epochs / max(time.perf_counter() - t_train, 1e-9)
            engine.update_weights({k: p.detach() for k, p in raw.named_parameters() if id(p) in stepped})
            metrics["train_seconds"] = time.perf_counter() - t_train
            record = {"step": step + 1, **_reduce(accelerator, metrics, world)}
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and eval_tasks:
                ev = evaluate_accuracy(engine, tok, source, eval_tasks, cfg)
                eval_after = ev["accuracy"]
                record.update({f"eval/{k}": v for k, v in ev.items()})
            if main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                history.append(record)
            if log_with:
                accelerator.log({k: v for k, v in record.items() if k != "step" and isinstance(v, int | float)}, step=step + 1)
            progress.update(step + 1, record)
            if on_step is not None:
                on_step(record)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                save(step + 1, f"checkpoint-{step + 1:07d}")
    finally:
        progress.close()
        rewards.close()

    final = save(cfg.steps, "final")
    seconds = time.perf_counter() - t0
    summary = GRPOSummary(
        steps=cfg.steps, final_dir=str(final), seconds=seconds, reward=float(record.get("reward", math.nan)),
        accuracy=float(record.get("accuracy", math.nan)), eval_before=eval_before, eval_after=eval_after,
        reward_errors=reward_errors,
    )  # fmt: skip
    if main:
        atomic_write_json(out / "summary.json", dataclasses.asdict(summary))
        if cfg.plot:
            plot_metrics(history, out / "rl.png")
    accelerator.wait_for_everyone()
    if log_with:
        accelerator.end_training()
    release_accelerator(accelerator)
    return summary


def _diverged(out: Path, step: int, what: str) -> None:
    last = _checkpoints(out)
    where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was written yet"
    raise RLError(
        f"the run diverged at step {step + 1}: {what}; stopped without saving it, {where}. "
        "Lower --lr (or check the reward scale) and --resume"
    )


def _step_metrics(rolls: list[Any], scored: list[Any], R: torch.Tensor, cfg: GRPOConfig) -> dict[str, float]:
    """Reward, accuracy, lengths and reward terms of one step, overall and per family."""
    m: dict[str, float] = {
        "reward": float(R.mean()),
        "reward_std": float(R.std()) if len(R) > 1 else 0.0,
        "accuracy": sum(r.score.passed for r in rolls) / len(rolls),
        "response_length": sum(r.completion_tokens for r in rolls) / len(rolls),
        "truncated": sum(r.finish_reason == "length" for r in rolls) / len(rolls),
        "assistant_steps": sum(r.steps for r in rolls) / len(rolls),
    }
    groups = R.view(-1, cfg.group_size)
    # Groups whose samples all scored the same: no advantage, no gradient from them.
    m["flat_group_share"] = float((groups.max(1).values == groups.min(1).values).float().mean())
    fam: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rolls):
        fam[r.task.family].append(i)
    for name, idx in sorted(fam.items()):
        m[f"reward/{name}"] = float(R[idx].mean())
        m[f"accuracy/{name}"] = sum(rolls[i].score.passed for i in idx) / len(idx)
    for term in scored[0].terms if scored else []:
        m[f"reward_term/{term}"] = sum(s.terms[term] for s in scored) / len(scored)
    m["rollout_tokens"] = float(sum(r.completion_tokens for r in rolls))
    return m


def _reduce(accelerator: Any, metrics: dict[str, float], world: int) -> dict[str, float]:
    """Mean of each metric over the processes (sums for token counts)."""
    if world == 1:
        out = dict(metrics)
    else:
        keys = sorted(metrics)
        gathered = accelerator.gather_for_metrics([metrics], use_gather_object=True)
        out = {}
        for k in keys:
            vals = [g[k] for g in gathered if k in g]
            out[k] = sum(vals) if k == "rollout_tokens" else sum(vals) / len(vals)
    if "rollout_seconds" in out:
        out["rollout_tokens_per_second"] = out["rollout_tokens"] / max(out["rollout_seconds"], 1e-9)
    return out


# The GRPO progress bar's columns (dsv.train.trainer.StepProgress).
_PROGRESS_FIELDS: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "reward": ("reward {}", lambda r: f"{r.get('reward', math.nan):.3f}"),
    "acc": ("acc {}", lambda r: f"{r.get('accuracy', math.nan):.2f}"),
    "len": ("len {}", lambda r: f"{r.get('response_length', math.nan):.0f}"),
    "tps": ("{} rollout tok/s", lambda r: f"{r.get('rollout_tokens_per_second', 0):,.0f}"),
}


_PANELS = (
    ("reward", ("reward",), "reward/"),
    ("accuracy", ("accuracy", "eval/accuracy"), "accuracy/"),
    ("KL to reference", ("loss/kl_ref",), None),
    ("clip fraction", ("loss/clip_frac_low", "loss/clip_frac_high"), None),
    ("masked share (OPSM)", ("loss/opsm_masked_frac",), None),
    ("route mismatch (free routing)", ("route_mismatch",), None),
    ("rollout-vs-train KL", ("rollout_train_kl",), None),
    ("response length", ("response_length",), None),
    ("tokens/s", ("rollout_tokens_per_second", "train_tokens_per_second"), None),
)


def plot_metrics(history: list[dict[str, Any]], path: Path) -> None:
    """The run's curves as one PNG (matplotlib Agg); skipped quietly when matplotlib is missing."""
    from dsv.core.plot import pyplot, save_png

    plt = pyplot()
    if plt is None or not history:
        return
    fig, axes = plt.subplots(3, 3, figsize=(13, 9))
    for ax, (title, keys, prefix) in zip(axes.flat, _PANELS, strict=True):
        names = list(keys)
        if prefix is not None:
            names += sorted({k for m in history for k in m if k.startswith(prefix)})
        for key in names:
            pts = [(m["step"], m[key]) for m in history if isinstance(m.get(key), int | float)]
            if pts:
                ax.plot(*zip(*pts, strict=True), label=key, marker="o" if key.startswith("eval/") else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=6)
    fig.tight_layout()
    save_png(fig, path, dpi=90)
