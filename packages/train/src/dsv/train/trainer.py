"""The training loop of every stage, on accelerate.

Stages (V3.2-Exp §2.1, spec §3):

- ``pretrain``: next-token loss (+ MTP loss, + the sequence-wise balance loss). Dense or DSA
  attention (``--attention``); with DSA the indexer learns from its KL loss on the selected set.
- ``dsa-warmup``: every parameter frozen except the lightning indexers; dense attention; loss =
  ``KL(head-summed, L1-normalised main attention || softmax(index scores))``; indexer recall is
  measured on the validation rows before and after.
- ``dsa-sparse``: top-k selection on, all parameters train on the LM loss; the indexer gets the KL
  loss restricted to its selected set with detached inputs (inside the model), so neither loss
  reaches the other's parameters.
- ``sft``: V3.2 chat encoding, loss only on assistant tokens; attention as configured (sparse for
  ``deepseek_v32``, as in post-training).

Per step: gradient accumulation (``no_sync`` until the last micro-batch), gradient clipping,
an LR from :func:`dsv.train.schedule.lr_at`, then the aux-loss-free MoE bias update of DeepSeek-V3
(``bias -= gamma * sign(load - mean_load)`` with the load summed over the global batch), for the
MTP layer's MoE too; gamma drops to 0 after ``bias_update_until`` of the steps (V3 §4.2: 0.001 for
the first 14.3T of 14.8T tokens, then 0).

The MTP layers are blocks with their own indexer and MoE: whenever the indexers learn (warm-up,
sparse attention) the MTP layers run so their indexer learns the same KL, and their recall is
reported beside the main layers'. ``--recipe v32`` (:mod:`dsv.train.recipes`) sets the published
V3.2 values of a stage.

Losses are sums over target tokens divided by the *global* number of targets in the step (known
on every process, since every process knows the whole batch plan), times the world size to undo
DDP's gradient averaging: N processes compute exactly the gradient of one process with the same
global batch.

Checkpoints: ``OUT/checkpoint-NNNNNNN/`` is a Hugging Face folder (``save_pretrained``) plus
``train_state/`` (run settings, step, optimizer state, RNG), written as one atomic folder rename;
``OUT/final/`` at the end. ``--resume`` restarts from the newest checkpoint that loads whole (a
damaged one, e.g. a truncated ``optimizer.pt``, is skipped with a warning for the one before it)
with the same data order (a pure function of seed and step) and refuses different settings; it
says which checkpoint it continues from, and that it starts at step 0 when there is none. Staging
folders of a save that was killed are removed at start.

Library use::

    from dsv.train import TrainConfig, train
    summary = train(TrainConfig(stage="pretrain", model="tiny", out="runs/tiny", steps=50))
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsv.core.checkpoint import atomic_write_bytes, atomic_write_json, load_pretrained, save_pretrained
from dsv.core.errors import DSVError
from dsv.train.data import IGNORE_INDEX, BatchPlan, DataError, PackedData, load_documents, pack
from dsv.train.losses import lm_terms
from dsv.train.schedule import SCHEDULES, lr_at

STAGES = ("pretrain", "dsa-warmup", "dsa-sparse", "sft")
# Stage defaults: (lr, schedule). Warm-up lr 1e-3 as in V3.2-Exp; constant schedules for the DSA stages.
_STAGE_DEFAULTS = {
    "pretrain": (1e-3, "cosine"),
    "dsa-warmup": (1e-3, "constant"),
    "dsa-sparse": (3e-4, "constant"),
    "sft": (2e-4, "cosine"),
}
# Settings that must match for --resume to continue the same run.
_RESUME_KEYS = (
    "stage", "steps", "micro_batch_size", "grad_accum", "seq_len", "lr", "schedule", "warmup_steps", "min_lr_ratio",
    "decay_fraction", "weight_decay", "max_grad_norm", "seed", "attention", "bias_update_speed", "aux_loss_alpha",
    "mtp_loss_weight", "indexer_loss_weight", "thinking", "val_fraction", "bias_update_until",
)  # fmt: skip


class TrainError(DSVError):
    """A training run cannot start or continue (bad settings, refused resume...)."""


@dataclass(kw_only=True)
class TrainConfig:
    """Settings of one stage run (the CLI flags map one-to-one)."""

    stage: str
    out: Path
    model: str = "tiny"  # a preset name (fresh weights + a BPE trained on the data) or a checkpoint folder
    data: list[str] = field(default_factory=lambda: ["default"])
    steps: int = 100
    micro_batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 128
    lr: float | None = None
    schedule: str | None = None
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: str | None = None  # no | bf16 | fp16; None = whatever `accelerate launch` set
    attention: str = "auto"  # dense | sparse | auto (sparse when the model has an indexer)
    bias_update_speed: float = 1e-3  # gamma of the aux-loss-free balance update
    bias_update_until: float = 1.0  # share of the steps after which gamma is 0 (V3: 14.3T of 14.8T tokens)
    aux_loss_alpha: float = 1e-4  # weight of the sequence-wise balance loss
    mtp_loss_weight: float = 0.1
    indexer_loss_weight: float = 1.0
    thinking: bool = True  # SFT: encode in thinking mode
    val_fraction: float = 0.05
    eval_every: int = 0  # 0: evaluate at the end only
    eval_rows: int = 16
    save_every: int = 50
    keep_last: int = 2
    log_every: int = 1
    resume: bool = False
    on_bad_record: str = "stop"
    default_data_size: int = 2000
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.stage not in STAGES:
            raise TrainError(f"unknown stage {self.stage!r}; choose one of: {', '.join(STAGES)}")
        lr, schedule = _STAGE_DEFAULTS[self.stage]
        self.lr = lr if self.lr is None else self.lr
        self.schedule = schedule if self.schedule is None else self.schedule
        checks = [
            (
                self.schedule in SCHEDULES,
                f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}",
            ),
            (
                self.attention in ("dense", "sparse", "auto"),
                f"--attention must be dense, sparse or auto, got {self.attention!r}",
            ),
            (
                self.on_bad_record in ("skip", "stop"),
                f"--on-bad-record must be skip or stop, got {self.on_bad_record!r}",
            ),
            (self.steps >= 1, "--steps must be >= 1"),
            (
                self.micro_batch_size >= 1 and self.grad_accum >= 1,
                "--micro-batch-size and --grad-accum must be >= 1",
            ),
            (self.seq_len >= 2, "--seq-len must be >= 2"),
            (self.lr > 0, "--lr must be > 0"),
            (0 <= self.val_fraction < 1, "--val-fraction must be in [0, 1)"),
            (0 <= self.bias_update_until <= 1, "--bias-update-until must be in [0, 1] (a share of the steps)"),
            (
                self.mixed_precision in (None, "no", "bf16", "fp16"),
                "--mixed-precision must be no, bf16 or fp16",
            ),
        ]
        for ok, why in checks:
            if not ok:
                raise TrainError(why)

    def run_settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _RESUME_KEYS}


@dataclass
class TrainSummary:
    """What a finished run reports (also written to ``OUT/summary.json``)."""

    stage: str
    steps: int
    final_dir: str
    tokens: int
    seconds: float
    tokens_per_second: float
    final_loss: float
    val_loss: float | None
    recall_before: float | None = None
    recall_after: float | None = None
    mtp_recall_before: float | None = None  # the MTP layers' indexer, beside the main layers'
    mtp_recall_after: float | None = None
    skipped_records: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- checkpoints


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints of a run folder, oldest first (a checkpoint is complete once renamed in)."""
    if not out.exists():
        return []
    found = [p for p in out.glob("checkpoint-*") if (p / "train_state" / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def remove_unfinished_saves(out: Path) -> list[Path]:
    """Delete the staging folders a killed save left in ``out`` (``.checkpoint-*.tmp``, ``.final.*.tmp``,
    ``.*.partial``); they never became a checkpoint. Returns what was removed."""
    if not out.is_dir():
        return []
    stale = [p for pattern in (".checkpoint-*.tmp", ".final.*.tmp", ".checkpoint-*.partial", ".final.partial")
             for p in out.glob(pattern) if p.is_dir()]  # fmt: skip
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def _weights_intact(folder: Path) -> str | None:
    """Why the safetensors files of ``folder`` are damaged (size against their header), or None."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return "no weight files"
    for f in files:
        try:
            with f.open("rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if f.stat().st_size != 8 + n + end:
                return f"{f.name} is truncated ({f.stat().st_size} of {8 + n + end} bytes)"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{f.name} is unreadable ({type(exc).__name__})"
    return None


def pick_resume_checkpoint(
    ckpts: list[Path], *, sharded: bool, log: Callable[[str], None] = print
) -> tuple[Path, dict[str, Any], Any] | None:
    """The newest checkpoint that loads whole: ``(folder, state.json, optimizer state or None)``.

    A checkpoint whose ``state.json``, ``rng.pt``, ``optimizer.pt`` or weights are damaged (a disk
    that filled, a copy cut short) is skipped with a line through ``log`` naming what is wrong, and
    the one before it is tried. None when no checkpoint is usable.
    """
    for ckpt in reversed(ckpts):
        state_dir = ckpt / "train_state"
        try:
            state = json.loads((state_dir / "state.json").read_text())
            if not isinstance(state.get("step"), int) or not isinstance(state.get("settings"), dict):
                raise ValueError("state.json has no step or settings")
            if not (state_dir / "rng.pt").is_file():
                raise FileNotFoundError("rng.pt is missing")
            damaged = _weights_intact(ckpt)
            if damaged is not None:
                raise ValueError(damaged)
            optim = None
            if not sharded:  # the sharded state is read by accelerate, after this choice
                optim = torch.load(state_dir / "optimizer.pt", weights_only=False, map_location="cpu")
        except Exception as exc:  # any damage: fall back to the previous checkpoint
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            log(f"warning: skipping {ckpt.name}, which cannot be resumed from: {reason}")
            continue
        return ckpt, state, optim
    return None


def _check_resume(saved: dict[str, Any], now: dict[str, Any], ckpt: Path) -> None:
    # A setting added after a checkpoint was written counts as its default there.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    saved = {k: saved.get(k, defaults.get(k)) for k in now}
    diffs = [f"{k} (checkpoint {saved.get(k)!r}, now {now[k]!r})" for k in now if saved.get(k) != now[k]]
    if diffs:
        raise TrainError(
            f"--resume refused: {ckpt} was written with different settings: {'; '.join(diffs)}. "
            "Use the same flags to continue, or a new --out folder to start another run"
        )


# ----------------------------------------------------------------------------- the run


def _resolve_model(cfg: TrainConfig, docs: list[Any]) -> tuple[Any, Any]:
    from dsv.core.presets import PRESETS

    if cfg.model in PRESETS:
        from dsv.core.model import DSVForCausalLM
        from dsv.core.tokenizer import default_corpus, train_bpe
        from dsv.train.data import tokenize_document  # noqa: F401  (documents render through it)

        mcfg = PRESETS[cfg.model]()
        texts = default_corpus(2000, seed=cfg.seed)
        for d in docs[:2000]:
            if d.is_chat:
                from dsv.core.chat import encode_messages

                texts.append(encode_messages(d.messages, tools=d.tools, thinking=cfg.thinking))
            else:
                texts.append(d.text)
        tok = train_bpe(texts, mcfg.vocab_size)
        torch.manual_seed(cfg.seed)
        model = DSVForCausalLM(mcfg)
        return model, tok
    path = Path(cfg.model).expanduser()
    if not path.exists():
        raise TrainError(
            f"--model {cfg.model!r} is neither a preset ({', '.join(PRESETS)}) nor an existing checkpoint folder"
        )
    model, tok = load_pretrained(path)
    if tok is None:
        raise TrainError(f"{path}: the checkpoint has no tokenizer.json; training needs one")
    return model, tok


def _use_sparse(cfg: TrainConfig, has_indexer: bool) -> bool:
    if cfg.stage == "dsa-warmup":
        return False
    if cfg.stage == "dsa-sparse":
        return True
    if cfg.attention == "sparse" and not has_indexer:
        raise TrainError(
            "--attention sparse needs a deepseek_v32 model; convert it with `dsv model convert --add-indexer`"
        )
    return has_indexer and cfg.attention != "dense"


def _configure_trainable(model: Any, cfg: TrainConfig, sparse: bool) -> None:
    indexer = {id(p) for p in model.indexer_parameters()}
    for p in model.parameters():
        if cfg.stage == "dsa-warmup":
            p.requires_grad_(id(p) in indexer)
        elif not sparse and id(p) in indexer:
            p.requires_grad_(False)  # dense attention: the indexer is not used, keep it out of the optimizer
        else:
            p.requires_grad_(True)


def _rng_state() -> bytes:
    buf = io.BytesIO()
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, buf)
    return buf.getvalue()


def _set_rng_state(data: bytes) -> None:
    state = torch.load(io.BytesIO(data), weights_only=False)
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


# Public names for the loops built on this one (dsv-rl): what a checkpoint's rng.pt holds, and the
# reset that lets another run start in the same process.
rng_state = _rng_state
set_rng_state = _set_rng_state


def train(cfg: TrainConfig, *, on_step: Callable[[dict[str, Any]], None] | None = None) -> TrainSummary:
    """Run one stage as configured; returns the summary (see the module docstring)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    out = cfg.out
    ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=True)  # idle experts get no gradient
    log_with = []
    if cfg.tensorboard:
        try:
            import tensorboard  # noqa: F401

            log_with = ["tensorboard"]
        except ImportError:
            pass
    # cpu=True without CUDA: a multi-process launch (`accelerate launch --multi_gpu`) then runs on
    # CPU with gloo; accelerate's own `--cpu` flag starts a single process unless mpirun is used.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision, kwargs_handlers=[ddp_kwargs], log_with=log_with or None,
        project_dir=str(out),
    )  # fmt: skip
    _fsdp_on_cpu(accelerator)
    main = accelerator.is_main_process
    world = accelerator.num_processes
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)

    # ---- resume point
    if main:
        stale = remove_unfinished_saves(out)
        if stale:
            accelerator.print(f"removed {len(stale)} unfinished checkpoint folder(s) left by an interrupted save")
    accelerator.wait_for_everyone()
    ckpts = list_checkpoints(out)
    if ckpts and not cfg.resume:
        raise TrainError(
            f"{out} already holds checkpoints (newest {ckpts[-1].name}); pass --resume to continue or choose a new --out"
        )
    resume_from = None
    state: dict[str, Any] = {}
    resumed_optim: Any = None
    if cfg.resume:
        log = accelerator.print
        picked = pick_resume_checkpoint(ckpts, sharded=sharded, log=log)
        if picked is None:
            # Not silent: a run killed during its first save has nothing to continue from.
            why = f"none of its {len(ckpts)} checkpoint(s) loads" if ckpts else "it holds no complete checkpoint"
            accelerator.print(f"--resume: {out} has nothing to continue from ({why}); starting at step 0")
        else:
            resume_from, state, resumed_optim = picked
            _check_resume(state["settings"], cfg.run_settings(), resume_from)
            accelerator.print(f"resuming from {resume_from} (step {int(state['step'])} of {cfg.steps})")

    # ---- data and model
    chat = cfg.stage == "sft"
    docs, problems = load_documents(cfg.data, on_bad_record=cfg.on_bad_record, chat=chat,  # type: ignore[arg-type]
                                    default_size=cfg.default_data_size, seed=cfg.seed)  # fmt: skip
    if resume_from is not None:
        model, tok = load_pretrained(resume_from)
        assert tok is not None
    else:
        model, tok = _resolve_model(cfg, docs)
    if model.config.vocab_size < tok.vocab_size:
        raise TrainError(
            f"tokenizer has {tok.vocab_size} ids but the model vocab_size is {model.config.vocab_size}"
        )
    has_indexer = model.config.has_indexer
    if cfg.stage in ("dsa-warmup", "dsa-sparse") and not has_indexer:
        raise TrainError(
            f"{cfg.stage} needs a deepseek_v32 model with an indexer; this one is {model.config.model_type}: "
            "run `dsv model convert --add-indexer` first"
        )
    packed = pack(tok, docs, cfg.seq_len, seed=cfg.seed, thinking=cfg.thinking,
                  on_bad_record=cfg.on_bad_record, problems=problems)  # type: ignore[arg-type]  # fmt: skip
    train_rows, val_rows = (
        packed.split(cfg.val_fraction, cfg.seed) if cfg.val_fraction > 0 else (packed, None)
    )
    if resume_from is not None and state.get("data_fingerprint") != packed.fingerprint():
        raise TrainError(
            f"--resume refused: the data differs from the data {resume_from} was trained on (fingerprint)"
        )
    for p in problems:
        accelerator.print(f"warning: skipped {p}")

    sparse = _use_sparse(cfg, has_indexer)
    want_indexer_loss = has_indexer and (cfg.stage == "dsa-warmup" or sparse)
    use_mtp = cfg.stage != "dsa-warmup" and bool(model.mtp_layers) and cfg.mtp_loss_weight > 0
    # The MTP layers' indexer selects keys like the others, so it learns whenever they do.
    run_mtp = bool(model.mtp_layers) and (use_mtp or want_indexer_loss)
    _configure_trainable(model, cfg, sparse)
    model.train()
    if accelerator.distributed_type == DistributedType.FSDP:
        _prepare_fsdp(accelerator, model)  # before the optimizer: it must hold the sharded parameters
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
    )  # fmt: skip
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.distributed_type == DistributedType.FSDP:
        params = [p for p in model.parameters() if p.requires_grad]  # the sharded ones, for clipping
    raw = accelerator.unwrap_model(model)
    start_step = 0
    if resume_from is not None:
        start_step = int(state["step"])
        if sharded:
            accelerator.load_state(str(resume_from / "train_state" / "accelerate"))
        else:
            optimizer.load_state_dict(resumed_optim)
            resumed_optim = None
        _set_rng_state((resume_from / "train_state" / "rng.pt").read_bytes())

    plan = BatchPlan(len(train_rows), cfg.micro_batch_size, cfg.grad_accum, world, cfg.seed)
    device = accelerator.device
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    history: list[dict[str, Any]] = []
    if main:
        if metrics_path.exists():
            kept = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
            history = [m for m in kept if m.get("step", 0) <= start_step] if resume_from is not None else []
        atomic_write_bytes(metrics_path, "".join(json.dumps(m) + "\n" for m in history).encode())
        atomic_write_json(out / "train_config.json", {**dataclasses.asdict(cfg), "out": str(cfg.out)})
    if log_with:
        accelerator.init_trackers(
            "dsv-train", config={k: v for k, v in cfg.run_settings().items() if v is not None}
        )

    eval_ids = (
        val_rows.input_ids[: cfg.eval_rows] if val_rows is not None else train_rows.input_ids[: cfg.eval_rows]
    )
    recall_before = mtp_recall_before = None
    if (
        has_indexer
        and cfg.stage in ("dsa-warmup", "dsa-sparse")
        and cfg.seq_len > raw.config.index_topk
        and start_step == 0
    ):
        raw.eval()
        recall_before, mtp_recall_before = _recalls(raw, eval_ids)
        raw.train()
        accelerator.print(f"indexer recall before: {recall_before:.4f}" + (
            f" (MTP layer {mtp_recall_before:.4f})" if mtp_recall_before is not None else ""))  # fmt: skip

    def save(step: int, folder_name: str, with_state: bool = True) -> Path:
        target = out / folder_name
        settings = {"step": step, "settings": cfg.run_settings(), "data_fingerprint": packed.fingerprint(),
                    "world": world, "stage": cfg.stage}  # fmt: skip
        extra: dict[str, bytes] = {}
        if with_state:
            extra["train_state/state.json"] = (json.dumps(settings, indent=2) + "\n").encode()
            extra["train_state/rng.pt"] = _rng_state()
            if not sharded:
                buf = io.BytesIO()
                torch.save(optimizer.state_dict(), buf)
                extra["train_state/optimizer.pt"] = buf.getvalue()
        if sharded:
            return _save_sharded(accelerator, model, tok, target, extra, with_state)
        if main:
            save_pretrained(raw, tok, target, extra_files=extra)
        accelerator.wait_for_everyone()
        return target

    # ---- the loop
    total_targets_cache: dict[int, int] = {}

    def step_targets(step: int) -> int:
        if step not in total_targets_cache:
            total_targets_cache.clear()
            total_targets_cache[step] = int((train_rows.labels[plan.step_rows(step)] != IGNORE_INDEX).sum())
        return total_targets_cache[step]

    progress = StepProgress("train", cfg.steps, start_step, _TRAIN_FIELDS, enabled=cfg.progress and main)
    t0 = time.perf_counter()
    tokens_seen = 0
    last_loss = float("nan")
    val_loss = None
    step = start_step
    try:
        for step in range(start_step, cfg.steps):
            lr = lr_at(step, lr=cfg.lr, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps, schedule=cfg.schedule,
                       min_lr_ratio=cfg.min_lr_ratio, decay_fraction=cfg.decay_fraction)  # type: ignore[arg-type]  # fmt: skip
            for group in optimizer.param_groups:
                group["lr"] = lr
            n_targets = max(1, step_targets(step))
            share = (
                cfg.micro_batch_size / plan.global_batch * world
            )  # per-sequence mean -> global mean, DDP-averaged
            logged_terms = ("lm", "mtp", "aux", "indexer")  # the dsv.train.losses names
            sums = torch.zeros(len(logged_terms), dtype=torch.float64, device=device)
            loads: list[torch.Tensor] | None = None
            for micro in range(cfg.grad_accum):
                rows = plan.micro_rows(step, micro, accelerator.process_index)
                ids = train_rows.input_ids[rows].to(device)
                labels = train_rows.labels[rows].to(device)
                last = micro == cfg.grad_accum - 1
                ctx = accelerator.no_sync(model) if not last else _nullcontext()
                with ctx:
                    o = model(ids, use_sparse=sparse, indexer_loss=want_indexer_loss, return_mtp=run_mtp)
                    terms = lm_terms(
                        o, labels, lm=cfg.stage != "dsa-warmup", token_scale=world / n_targets, batch_scale=share,
                        mtp_weight=cfg.mtp_loss_weight, aux_weight=cfg.aux_loss_alpha,
                        indexer_weight=cfg.indexer_loss_weight,
                    )  # fmt: skip
                    sums += terms.stacked(logged_terms).to(device)
                    accelerator.backward(terms.total())
                if o.expert_load:
                    batch_load = torch.stack([x.float() for x in o.expert_load + o.mtp_expert_load])
                    loads = batch_load if loads is None else loads + batch_load
            grad_norm = (
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
            )
            if accelerator.distributed_type == DistributedType.FSDP:
                _drop_idle_expert_grads(raw)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            gamma = cfg.bias_update_speed if step < cfg.bias_update_until * cfg.steps else 0.0
            if loads is not None and gamma > 0 and cfg.stage != "dsa-warmup":
                loads = accelerator.reduce(loads, reduction="sum")
                balanced = raw.moe_layers + raw.mtp_moe_layers[: len(loads) - len(raw.moe_layers)]
                with torch.no_grad():
                    for moe, load in zip(balanced, loads, strict=True):
                        moe.gate.e_score_correction_bias -= gamma * torch.sign(
                            load - load.mean()
                        )
            # each term's values summed over micro-batches and processes, / world: the step's loss
            logged = dict(
                zip(logged_terms, (accelerator.reduce(sums, reduction="sum") / world).tolist(), strict=True)
            )
            tokens_seen += plan.global_batch * cfg.seq_len
            record: dict[str, Any] = {"step": step + 1, "lr": lr}
            if cfg.stage != "dsa-warmup":
                record["loss"] = logged["lm"]
                last_loss = record["loss"]
                if use_mtp:
                    record["mtp_loss"] = logged["mtp"]
                if logged["aux"] != 0:
                    record["aux_loss"] = logged["aux"]
            if want_indexer_loss:
                record["indexer_loss"] = logged["indexer"]
                if cfg.stage == "dsa-warmup":
                    last_loss = record["indexer_loss"]
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            elapsed = time.perf_counter() - t0
            record["tokens_per_second"] = tokens_seen / max(elapsed, 1e-9)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and val_rows is not None:
                val_loss = _evaluate(raw, val_rows, cfg, sparse)
                record["val_loss"] = val_loss
            if main and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps):
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                history.append(record)
            if log_with:
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step + 1)
            progress.update(step + 1, record)
            if on_step is not None:
                on_step(record)
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                save(step + 1, f"checkpoint-{step + 1:07d}")
                if main:
                    for old in list_checkpoints(out)[: -cfg.keep_last] if cfg.keep_last > 0 else []:
                        shutil.rmtree(old, ignore_errors=True)
    finally:
        progress.close()

    # ---- the end: evaluation, final checkpoint, summary, plot
    seconds = time.perf_counter() - t0
    if val_rows is not None and cfg.stage != "dsa-warmup":
        val_loss = _evaluate(raw, val_rows, cfg, sparse)
    recall_after = mtp_recall_after = None
    if has_indexer and cfg.stage in ("dsa-warmup", "dsa-sparse") and cfg.seq_len > raw.config.index_topk:
        raw.eval()
        recall_after, mtp_recall_after = _recalls(raw, eval_ids)
        raw.train()
    final = save(cfg.steps, "final", with_state=True)
    summary = TrainSummary(
        stage=cfg.stage, steps=cfg.steps, final_dir=str(final), tokens=tokens_seen, seconds=seconds,
        tokens_per_second=tokens_seen / max(seconds, 1e-9), final_loss=last_loss, val_loss=val_loss,
        recall_before=recall_before, recall_after=recall_after, mtp_recall_before=mtp_recall_before,
        mtp_recall_after=mtp_recall_after, skipped_records=problems,
    )  # fmt: skip
    if main:
        atomic_write_json(out / "summary.json", dataclasses.asdict(summary))
        if cfg.plot:
            _plot(history, out / "loss.png", cfg.stage)
    accelerator.wait_for_everyone()
    if log_with:
        accelerator.end_training()  # closes the trackers (and, in accelerate >= 1.x, the process group)
    _release(accelerator)
    return summary


def _recalls(raw: Any, ids: torch.Tensor) -> tuple[float, float | None]:
    """Indexer recall of the main layers and of the MTP layers (None without them)."""
    from dsv.train.metrics import recall_stats

    with _full_params(raw):  # the metric recomputes attention from the layers' weights
        st = recall_stats(raw, ids)
    return st.indexer, st.mtp_indexer


@contextlib.contextmanager
def _full_params(model: Any) -> Iterator[None]:
    """FSDP2: every unit's parameters stay gathered inside the block (code that reads weights
    outside a forward would meet their shards); elsewhere a no-op."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    groups = [u._get_fsdp_state()._fsdp_param_group for u in units]
    saved = [g.post_forward_mesh_info if g is not None else None for g in groups]
    for u in units:
        u.set_reshard_after_forward(False, recurse=False)
        u.unshard()
    try:
        yield
    finally:
        for u, g, info in zip(units, groups, saved, strict=True):
            if g is not None:
                g.post_forward_mesh_info = info  # back to the plan's setting
            u.reshard()


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _release(accelerator: Any) -> None:
    """Forget accelerate's process-wide state so another run can start in the same process (tests,
    library callers); the process group of a launched multi-process job is left alone."""
    if accelerator.num_processes == 1:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


release_accelerator = _release


@torch.no_grad()
def _evaluate(raw: Any, rows: PackedData, cfg: TrainConfig, sparse: bool) -> float:
    from dsv.train.metrics import validation_loss

    was_training = raw.training
    raw.eval()
    try:
        return validation_loss(
            raw, rows.input_ids[: cfg.eval_rows], rows.labels[: cfg.eval_rows], use_sparse=sparse
        )
    finally:
        raw.train(was_training)


def _fsdp_on_cpu(accelerator: Any) -> None:
    """Honour an FSDP launch on CPU processes: accelerate (1.16) turns on FSDP only for GPU-type
    process groups, so ``cpu=True`` with an FSDP config silently ran DDP over gloo. torch's
    ``fully_shard`` itself works on a gloo group, so the state is switched to FSDP with the
    plugin the launch configured (its env vars), and ``prepare`` shards the model as on GPUs."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or os.environ.get("ACCELERATE_USE_FSDP", "").lower() != "true":
        return
    state.fsdp_plugin = FullyShardedDataParallelPlugin()
    state.distributed_type = DistributedType.FSDP
    # Every AcceleratorState() copies PartialState's fields back; accelerate records FSDP there too.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def _prepare_fsdp(accelerator: Any, model: Any) -> None:
    """What FSDP2 needs from this model before ``prepare`` shards it.

    - A rank reduce-scatters only the gradients its unit's parameters have, and an expert that no
      token of the rank's batch picked has none: the ranks' collectives then differ in size (gloo:
      "Received data size doesn't match expected size"). Each MoE adds 0 x its experts' weights to
      its output, so every expert gets a (zero) gradient on every rank, as DDP's
      ``find_unused_parameters`` does for DDP.
    - MTP layers are Blocks, so wrapping every Block made each its own unit, but the model calls
      their embedding, ``eh_proj`` and shared head outside ``MTPLayer.forward``, where a unit's
      parameters are still sharded. With the shipped plan (``Block``) the main Blocks are wrapped
      here with the plugin's settings and the MTP layers stay in the root unit, whose parameters
      are gathered for the whole forward.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from dsv.core.model.moe import MoE

    def every_expert(moe: Any, _inputs: Any, output: Any) -> Any:
        weights = [p for p in moe.experts.parameters() if p.requires_grad]
        if not weights or not torch.is_grad_enabled():
            return output
        zero = torch.stack([w.view(-1)[0] for w in weights]).sum() * 0
        return (output[0] + zero.to(output[0].dtype), *output[1:])

    for module in model.modules():
        if isinstance(module, MoE):
            module.register_forward_hook(every_expert)
    plugin = accelerator.state.fsdp_plugin
    if accelerator.is_fsdp2 and model.mtp_layers and plugin.transformer_cls_names_to_wrap == ["Block"]:
        kwargs = {"reshard_after_forward": plugin.reshard_after_forward, "offload_policy": plugin.cpu_offload,
                  "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy()}  # fmt: skip
        for block in model.blocks:
            fully_shard(block, **kwargs)
        plugin.transformer_cls_names_to_wrap = []  # accelerate wraps the root only


def _drop_idle_expert_grads(model: Any) -> None:
    """FSDP: an expert that no token on any rank picked holds the explicit zero gradient of
    :func:`_prepare_fsdp`'s hook; dropping it lets AdamW skip the expert (no weight decay, no
    step on its old moments), as one process does for an expert without a gradient."""
    from dsv.core.model.moe import MoE

    def local(g: torch.Tensor) -> torch.Tensor:
        return g.to_local() if hasattr(g, "to_local") else g

    for moe in model.modules():
        if not isinstance(moe, MoE):
            continue
        for expert in moe.experts:
            grads = [p.grad for p in expert.parameters() if p.grad is not None]
            if grads and not any(bool(local(g).any()) for g in grads):
                for p in expert.parameters():
                    p.grad = None


def _save_sharded(
    accelerator: Any, model: Any, tok: Any, target: Path, extra: dict[str, bytes], with_state: bool
) -> Path:
    """FSDP / DeepSpeed: gather a full state dict for the HF folder and let accelerate write the
    sharded optimizer state beside it; the main process renames the finished folder into place."""
    from dsv.core.checkpoint import replace_dir
    from dsv.core.model import DSVForCausalLM

    staging = target.with_name(f".{target.name}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    full = accelerator.get_state_dict(model)  # gathered on the main process
    if with_state:
        accelerator.save_state(str(staging / "accelerate"))
    if accelerator.is_main_process:
        with torch.device("meta"):
            shadow = DSVForCausalLM(accelerator.unwrap_model(model).config)
        shadow.load_state_dict({k: v.cpu() for k, v in full.items()}, strict=False, assign=True)
        hf = save_pretrained(shadow, tok, target.with_name(f".{target.name}.hf"), extra_files=extra)
        if with_state:
            os.replace(staging / "accelerate", hf / "train_state" / "accelerate")
        shutil.rmtree(staging, ignore_errors=True)
        replace_dir(hf, target)
    accelerator.wait_for_everyone()
    return target


class StepProgress:
    """A rich progress bar over optimiser steps (main process only): the stage's label, the bar,
    ``step/total``, one column per entry of ``fields`` and the ETA.

    ``fields`` maps a column's name to its text (``"loss {}"``, the value in place of ``{}``) and the
    function that formats that value from a step's metrics record; dsv train and dsv rl show their own.
    """

    def __init__(
        self,
        label: str,
        total: int,
        start: int,
        fields: Mapping[str, tuple[str, Callable[[dict[str, Any]], str]]],
        *,
        enabled: bool,
    ) -> None:
        self.enabled = enabled
        self.fields = dict(fields)
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = [TextColumn(text.replace("{}", f"{{task.fields[{name}]}}")) for name, (text, _) in self.fields.items()]
        self.bar = Progress(
            TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), *columns, TextColumn("ETA"),
            TimeRemainingColumn(),
        )  # fmt: skip
        self.task = self.bar.add_task(label, total=total, completed=start, **dict.fromkeys(self.fields, "-"))
        self.bar.start()

    def update(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.bar.update(self.task, completed=step, **{name: fmt(record) for name, (_, fmt) in self.fields.items()})

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()


_TRAIN_FIELDS: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "loss": ("loss {}", lambda r: f"{r.get('loss', r.get('indexer_loss', math.nan)):.4f}"),
    "tps": ("{} tok/s", lambda r: f"{r['tokens_per_second']:,.0f}"),
}


def _plot(history: list[dict[str, Any]], path: Path, stage: str) -> None:
    """Loss curve PNG (matplotlib Agg); skipped quietly when matplotlib is missing."""
    from dsv.core.plot import pyplot, save_png

    plt = pyplot()
    if plt is None or not history:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "indexer_loss", "val_loss"):
        pts = [(m["step"], m[key]) for m in history if key in m]
        if pts:
            ax.plot(
                *zip(*pts, strict=True), label=key, marker="o" if key == "val_loss" else None, markersize=3
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"dsv train {stage}")
    ax.legend()
    fig.tight_layout()
    save_png(fig, path, dpi=100)


__all__ = [
    "STAGES", "DataError", "TrainConfig", "TrainError", "TrainSummary", "list_checkpoints", "release_accelerator",
    "rng_state", "set_rng_state", "train",
]  # fmt: skip
