"""``dsv rl grpo``: a thin Typer command over :func:`dsv.rl.trainer.grpo`.

Single process on CPU is the default; several processes go through accelerate with a config from
``configs/accelerate/``::

    dsv rl grpo --model runs/sft/final --tasks arithmetic --out runs/rl --steps 50
    accelerate launch --config_file configs/accelerate/cpu_2proc.yaml -m dsv.rl grpo --model ... --out runs/rl2

torch is imported inside the command so ``dsv --help`` stays instant; user mistakes print one
``error:`` line and exit with the codes of :mod:`dsv.cli.errors` (1 input, 2 usage, 130 Ctrl-C).
"""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console

console = Console()

rl_app = typer.Typer(
    help="Reinforcement learning: GRPO with the DeepSeek-V3.2 stabilisers, rollouts on the dsv engine.",
    no_args_is_help=True,
)


@rl_app.callback()
def _group() -> None:
    """Reinforcement learning: GRPO with the DeepSeek-V3.2 stabilisers, rollouts on the dsv engine."""
    # A callback keeps `grpo` a subcommand (Typer runs a lone command as the app itself).


def _family_beta(items: list[str]) -> dict[str, float]:
    from dsv.rl.trainer import RLError

    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            raise RLError(f"--family-beta takes FAMILY=BETA (e.g. arithmetic=0), got {item!r}") from None
        if not sep or not name:
            raise RLError(f"--family-beta takes FAMILY=BETA (e.g. arithmetic=0), got {item!r}")
    return out


@rl_app.command("grpo")
def grpo_command(
    model: str = typer.Option(..., "--model", help="Checkpoint folder to start from (an SFT'd model)."),
    out: Path = typer.Option(..., "--out", help="Run folder: checkpoints, metrics.jsonl, rl.png, final/."),
    tasks: list[str] = typer.Option(
        ["arithmetic"], "--tasks",
        help="Prompt sources, mixed round robin (repeatable): a synth family, rg:<reasoning-gym dataset>, or a task file (JSONL).",
    ),
    reward: list[str] = typer.Option(
        ["verifier"], "--reward",
        help="Reward terms, summed with weights (repeatable): verifier | format | length | PATH.py:FUNCTION, each with an optional =WEIGHT.",
    ),
    steps: int = typer.Option(100, help="Rollout + update steps."),
    prompts: int = typer.Option(8, help="Prompts per step (per process)."),
    group_size: int = typer.Option(8, "--group-size", "-G", help="G: samples per prompt (>= 2)."),
    lr: float = typer.Option(1e-5, help="Learning rate (AdamW)."),
    weight_decay: float = typer.Option(0.0),
    max_grad_norm: float = typer.Option(1.0, help="Gradient clipping norm (0 = off)."),
    seed: int = typer.Option(0, help="Seed of the task stream, the rollouts and the run."),
    difficulty: int = typer.Option(1, help="Difficulty of generated family tasks."),
    temperature: float = typer.Option(1.0, help="Rollout sampling temperature (> 0)."),
    top_p: float = typer.Option(1.0, help="Rollout nucleus sampling (1 = off)."),
    top_k: int = typer.Option(0, help="Rollout top-k (0 = off)."),
    max_tokens: int = typer.Option(128, help="Tokens per assistant step."),
    max_turns: int = typer.Option(4, help="Assistant steps per tool episode."),
    max_len: int = typer.Option(1024, help="Tokens per episode, prompt included."),
    thinking: bool = typer.Option(False, "--thinking/--no-thinking", help="Encode prompts in thinking mode."),
    beta: float = typer.Option(0.0, help="KL weight to the reference (the starting model); 0 = no KL term."),
    family_beta: list[str] = typer.Option(
        [], "--family-beta", help="FAMILY=BETA: the KL weight of one task family (repeatable; V3.2 weakens it for maths)."
    ),
    kl: str = typer.Option("unbiased", help="KL estimator: unbiased (k3 x the ratio to the sampling policy, V3.2) | k3."),
    eps_low: float = typer.Option(0.2, help="Clip range below 1 of the ratio."),
    eps_high: float = typer.Option(0.2, help="Clip range above 1 of the ratio (DAPO's clip-higher: raise it)."),
    aggregation: str = typer.Option(
        "grpo", help="Loss aggregation: grpo (1/|o_i| per sequence) | dr_grpo (constant max length) | dapo (all tokens)."
    ),
    level: str = typer.Option("token", help="Importance ratio per token (GRPO) or per sequence (GSPO)."),
    advantage_scale: str = typer.Option(
        "none", help="Advantage R - mean(group), divided by: none (V3.2) | group (group std) | batch (batch std)."
    ),
    opsm_delta: float | None = typer.Option(
        None, help="Off-policy sequence masking: mask negative-advantage samples whose mean log(pi_old/pi) > DELTA (unset = off)."
    ),
    keep_routing: bool = typer.Option(
        True, "--keep-routing/--no-keep-routing", help="Force the rollout's MoE routes in every training forward."
    ),
    keep_sampling_mask: bool = typer.Option(
        True, "--keep-sampling-mask/--no-keep-sampling-mask",
        help="Mask pi_theta's logits to the rollout's top-k/top-p kept sets before the softmax.",
    ),
    tis_cap: float | None = typer.Option(
        None, help="Truncated importance sampling against the engine's probabilities, weights capped at C (unset = off)."
    ),
    ppo_epochs: int = typer.Option(1, help="Optimiser steps on each rollout batch."),
    reward_timeout: float = typer.Option(10.0, help="Seconds a reward function may take before it scores 0."),
    holdout: int = typer.Option(32, help="Task files: tasks kept out of training for --eval-every."),
    eval_every: int = typer.Option(0, help="Greedy held-out accuracy every N steps (0 = off)."),
    eval_tasks: int = typer.Option(32, help="Held-out tasks per evaluation."),
    save_every: int = typer.Option(10, help="Checkpoint every N steps (0 = only the final one)."),
    keep_last: int = typer.Option(2, help="Checkpoints to keep (0 = all)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out."),
    mixed_precision: str | None = typer.Option(None, help="no | bf16 | fp16 (default: accelerate's setting)."),
    library: str | None = typer.Option(None, help="Environment library folder of `dsv synth build` (extra families)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """GRPO (DeepSeek-V3.2): G rollouts per prompt on the dsv engine, verified rewards, clipped update."""
    from dsv.cli.errors import ExitCode, exit_for, fail, writable_dir
    from dsv.rl.trainer import GRPOConfig, grpo

    try:
        writable_dir(out, "--out")
        cfg = GRPOConfig(
            model=model, out=out, tasks=list(tasks), rewards=list(reward), steps=steps, prompts=prompts,
            group_size=group_size, lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed,
            difficulty=difficulty, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
            max_turns=max_turns, max_len=max_len, thinking=thinking, beta=beta, family_beta=_family_beta(family_beta),
            kl=kl, eps_low=eps_low, eps_high=eps_high, aggregation=aggregation, level=level,
            advantage_scale=advantage_scale, opsm_delta=opsm_delta, keep_routing=keep_routing,
            keep_sampling_mask=keep_sampling_mask, tis_cap=tis_cap, ppo_epochs=ppo_epochs,
            reward_timeout=reward_timeout, holdout=holdout, eval_every=eval_every, eval_tasks=eval_tasks,
            save_every=save_every, keep_last=keep_last, resume=resume, mixed_precision=mixed_precision,
            library=library, progress=progress,
        )  # fmt: skip
        summary = grpo(cfg)
    except KeyboardInterrupt:
        fail(f"interrupted; `dsv rl grpo ... --out {out} --resume` continues from the newest checkpoint",
             ExitCode.INTERRUPTED)  # fmt: skip
    except Exception as exc:
        exit_for(exc)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    parts = [f"grpo: {summary.steps} steps in {summary.seconds:.0f}s", f"reward {summary.reward:.3f}",
             f"accuracy {summary.accuracy:.2f}"]  # fmt: skip
    if summary.eval_before is not None and summary.eval_after is not None:
        parts.append(f"held-out {summary.eval_before:.2f} -> {summary.eval_after:.2f}")
    if summary.reward_errors:
        parts.append(f"{summary.reward_errors} reward error(s) scored 0 (see the log)")
    console.print(", ".join(parts) + f"; checkpoint {summary.final_dir}")
