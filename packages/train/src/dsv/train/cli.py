"""``dsv train STAGE``: thin Typer commands over :func:`dsv.train.trainer.train`.

One command per stage (pretrain, dsa-warmup, dsa-sparse, sft), all with the same flags. Multi-process
runs go through accelerate with a config from ``configs/accelerate/``::

    dsv train pretrain --model tiny --out runs/tiny --steps 200
    dsv train dsa-sparse --recipe v32 --model CKPT --out runs/sparse   # the published V3.2 values
    dsv train recipe v32                                               # ...and where each comes from
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m dsv.train pretrain --out runs/tiny2

torch is imported inside the command so ``dsv --help`` stays instant; user mistakes print one
``error:`` line and exit with the codes of :mod:`dsv.cli.errors` (1 input, 2 usage, 130 Ctrl-C).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

console = Console()
err = Console(stderr=True)

train_app = typer.Typer(
    help="Train: pretrain, the two DSA stages (dsa-warmup, dsa-sparse) and chat SFT; resumable HF checkpoints.",
    no_args_is_help=True,
)


def _run(stage: str, recipe: str | None, given: set[str], **flags: Any) -> None:
    from dsv.cli.errors import ExitCode, exit_for, fail, writable_dir
    from dsv.train.trainer import TrainConfig, train

    try:
        if recipe is not None:
            from dsv.train.recipes import apply_recipe, describe, get_recipe

            chosen = get_recipe(recipe, stage)
            flags = apply_recipe(chosen, {k: v for k, v in flags.items() if k in given or k not in chosen.settings})
            console.print("\n".join(describe(chosen, given & set(chosen.settings))), highlight=False, soft_wrap=True)
        writable_dir(flags["out"], "--out")
        cfg = TrainConfig(stage=stage, **flags)
        summary = train(cfg)
    except KeyboardInterrupt:
        fail(
            f"interrupted; `dsv train {stage} --out {flags['out']} --resume` continues from the newest "
            "checkpoint",
            ExitCode.INTERRUPTED,
        )
    except Exception as exc:
        exit_for(exc)
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    parts = [f"{stage}: {summary.steps} steps", f"{summary.tokens_per_second:,.0f} tok/s"]
    if summary.final_loss == summary.final_loss:
        parts.append(f"final loss {summary.final_loss:.4f}")
    if summary.val_loss is not None:
        parts.append(f"val loss {summary.val_loss:.4f}")
    if summary.recall_before is not None:
        parts.append(f"recall {summary.recall_before:.3f} -> {summary.recall_after:.3f}")
    if summary.mtp_recall_before is not None:
        parts.append(f"MTP layer recall {summary.mtp_recall_before:.3f} -> {summary.mtp_recall_after:.3f}")
    if summary.skipped_records:
        parts.append(f"{len(summary.skipped_records)} bad record(s) skipped")
    console.print(", ".join(parts) + f"; checkpoint {summary.final_dir}")


def _stage_command(stage: str, doc: str) -> Callable[..., None]:
    def command(
        ctx: typer.Context,
        out: Path = typer.Option(
            ..., "--out", help="Run folder: checkpoints, metrics.jsonl, loss.png, final/."
        ),
        model: str = typer.Option(
            "tiny", "--model", help="Preset name (fresh weights) or checkpoint folder."
        ),
        data: list[str] = typer.Option(
            ["default"],
            "--data",
            help="Text/JSONL files, dataset folders, task files or 'default' (repeatable).",
        ),
        steps: int = typer.Option(100, help="Optimizer steps."),
        micro_batch_size: int = typer.Option(4, help="Sequences per process per micro-step."),
        grad_accum: int = typer.Option(1, help="Micro-steps per optimizer step."),
        seq_len: int = typer.Option(128, help="Tokens per packed sequence."),
        lr: float | None = typer.Option(None, help="Peak learning rate (stage default if unset)."),
        schedule: str | None = typer.Option(None, help="cosine | wsd | constant (stage default if unset)."),
        warmup_steps: int = typer.Option(0, help="Linear LR warm-up steps."),
        min_lr_ratio: float = typer.Option(0.1, help="Final LR as a fraction of the peak (cosine, wsd)."),
        decay_fraction: float = typer.Option(0.2, help="WSD: share of steps in the final decay."),
        weight_decay: float = typer.Option(0.1),
        max_grad_norm: float = typer.Option(1.0, help="Gradient clipping norm (0 = off)."),
        seed: int = typer.Option(0),
        mixed_precision: str | None = typer.Option(
            None, help="no | bf16 | fp16 (default: accelerate's setting)."
        ),
        attention: str = typer.Option("auto", help="pretrain/sft: dense | sparse | auto."),
        bias_update_speed: float = typer.Option(1e-3, help="MoE aux-loss-free bias update speed gamma."),
        bias_update_until: float = typer.Option(
            1.0, help="Share of the steps after which gamma is 0 (DeepSeek-V3: 14.3T of 14.8T tokens)."
        ),
        aux_loss_alpha: float = typer.Option(1e-4, help="Weight of the sequence-wise balance loss."),
        mtp_loss_weight: float = typer.Option(0.1, help="Weight of the MTP loss (0 = off)."),
        indexer_loss_weight: float = typer.Option(1.0, help="Weight of the indexer KL loss."),
        thinking: bool = typer.Option(True, "--thinking/--no-thinking", help="sft: encode in thinking mode."),
        val_fraction: float = typer.Option(0.05, help="Share of packed rows held out for validation."),
        eval_every: int = typer.Option(0, help="Validation every N steps (0 = at the end)."),
        save_every: int = typer.Option(50, help="Checkpoint every N steps (0 = only the final one)."),
        keep_last: int = typer.Option(2, help="Checkpoints to keep (0 = all)."),
        log_every: int = typer.Option(1, help="metrics.jsonl record every N steps."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out."),
        on_bad_record: str = typer.Option(
            "stop", help="A broken data record: stop (error) or skip (reported)."
        ),
        default_data_size: int = typer.Option(2000, help="Documents in the embedded 'default' data set."),
        progress: bool = typer.Option(True, "--progress/--no-progress"),
        recipe: str | None = typer.Option(
            None, "--recipe", help="Published settings of the stage: v32 (`dsv train recipe v32` lists them); "
            "flags you give win."
        ),
    ) -> None:
        flags = {k: v for k, v in locals().items() if k not in ("stage", "ctx", "recipe")}
        # Flags typed on the command line win over a recipe (by name: typer may vendor its own click).
        sources = {k: ctx.get_parameter_source(k) for k in flags}
        given = {k for k, src in sources.items() if src is not None and src.name != "DEFAULT"}
        _run(stage, recipe, given, **flags)

    command.__doc__ = doc
    return command


_DOCS = {
    "pretrain": "Next-token training (dense or DSA), from a preset or a checkpoint.",
    "dsa-warmup": "DSA stage 1: train only the indexer to match the dense attention (KL); reports recall.",
    "dsa-sparse": "DSA stage 2: top-k sparse attention on, all parameters train; indexer KL on the selected set.",
    "sft": "Chat SFT in the V3.2 encoding, loss only on assistant tokens (reasoning and tool calls included).",
}
for _stage, _doc in _DOCS.items():
    train_app.command(_stage, help=_doc)(_stage_command(_stage, _doc))


@train_app.command("recipe")
def recipe_command(
    name: str = typer.Argument(..., help="Recipe name: v32."),
    stage: list[str] = typer.Option([], "--stage", help="Only this stage (repeatable); default: every stage."),
) -> None:
    """Print a recipe's values and the source of each, stage by stage (what --recipe NAME sets)."""
    from dsv.cli.errors import exit_for
    from dsv.train.recipes import RECIPE_STAGES, describe, get_recipe

    try:
        stages = stage or list(RECIPE_STAGES.get(name, ("dsa-sparse",)))
        recipes = [get_recipe(name, s) for s in stages]
    except Exception as exc:
        exit_for(exc)
    console.print("\n\n".join("\n".join(describe(r)) for r in recipes), highlight=False, soft_wrap=True)
