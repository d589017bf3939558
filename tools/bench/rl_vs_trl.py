"""GRPO on a CPU: dsv rl (rollouts on the serve engine) against TRL's ``GRPOTrainer`` (rollouts with
transformers ``generate``), same tiny checkpoint, same prompts, same G and lengths; and an ablation of
the four stabilisers as one PNG.

Benchmark (default): a random tiny checkpoint (dsv's ``tiny`` preset with a trained BPE) is loaded by
dsv and by transformers (``DeepseekV32ForCausalLM``). Both run GRPO on the same ``combinatorics``
prompts in the V3.2 chat encoding, ``--prompts`` x G completions of exactly ``--max-tokens`` tokens
per step (EOS is never drawn by the random model before the limit), temperature 1, beta 0, one
optimiser step per batch. Measured per step after ``--warmup`` steps: the whole GRPO step, wall clock
(rollout + rewards + update + weights into the engine; TRL's from its step-begin to its step-end
callback) and rollout tokens/s (completion tokens over the rollout's own time; TRL's is timed
around its ``generate`` calls). Runs alternate between the two; medians over ``--runs`` runs, and the
ratio inside each run::

    OMP_NUM_THREADS=1 python tools/bench/rl_vs_trl.py --runs 3

Ablation (``--ablation OUT.png``): the ``rg:aiw`` warm start of the learning test (dsv-rl's tests),
GRPO with every stabiliser on and then each one off (β 0.01 → 0, OPSM δ 0.5 → off, Keep Routing off,
Keep Sampling Mask off), top-k 64 sampling; reward curves and the rollout-vs-train KL per variant::

    OMP_NUM_THREADS=1 python tools/bench/rl_vs_trl.py --ablation BENCH_rl_ablation.png --steps 20

Needs ``pip install 'dsv-rl[bench]'`` (trl, transformers, datasets) for the benchmark and
reasoning_gym (``dsv-synth[rg]``) for the ablation.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _checkpoint(folder: Path) -> Path:
    from dsv.core.checkpoint import save_pretrained
    from dsv.core.model import DSVForCausalLM
    from dsv.core.presets import tiny
    from dsv.core.tokenizer import default_corpus, train_bpe

    torch.manual_seed(0)
    return save_pretrained(DSVForCausalLM(tiny()), train_bpe(default_corpus(800), 1024), folder / "tiny")


def _prompts(n: int) -> list[str]:
    from dsv.core.chat import encode_messages
    from dsv.synth import registry

    env = registry.get("combinatorics")
    out = []
    for seed in range(n):
        t = env.generate(seed, 1)
        out.append(encode_messages([{"role": "user", "content": f"{t.prompt}\n\n{t.answer_format}"}], thinking=False))
    return out


def run_dsv(ckpt: Path, out: Path, args: argparse.Namespace) -> list[dict[str, float]]:
    """Per-step timings of ``dsv.rl.grpo`` (the tasks are the same combinatorics seeds as TRL's)."""
    from dsv.rl import GRPOConfig, grpo

    rows: list[dict[str, float]] = []
    last = [time.perf_counter()]

    def on_step(r: dict[str, Any]) -> None:
        # The whole step, wall clock from the end of the previous one: rollout, rewards, update,
        # weights into the engine, metrics (the first step also the start-up: a warm-up step).
        now = time.perf_counter()
        rows.append({"step_s": now - last[0], "rollout_tok_s": r["rollout_tokens_per_second"], "tokens": r["rollout_tokens"]})
        last[0] = now

    grpo(GRPOConfig(model=str(ckpt), out=out, tasks=["combinatorics"], steps=args.steps, prompts=args.prompts,
                    group_size=args.group_size, max_tokens=args.max_tokens, lr=1e-6, temperature=1.0,
                    save_every=0, progress=False, tensorboard=False, plot=False), on_step=on_step)  # fmt: skip
    return rows[args.warmup :]


def run_trl(ckpt: Path, out: Path, args: argparse.Namespace) -> list[dict[str, float]]:
    """Per-step timings of TRL's GRPOTrainer on the transformers model of the same checkpoint."""
    import transformers
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(ckpt / "tokenizer.json"), eos_token="<｜end▁of▁sentence｜>",
                                               pad_token="<｜end▁of▁sentence｜>", bos_token="<｜begin▁of▁sentence｜>")  # fmt: skip
    tok.padding_side = "left"
    n = args.prompts * (args.steps + 1)
    data = Dataset.from_dict({"prompt": _prompts(n)})
    gen = {"seconds": 0.0, "tokens": 0}
    real_generate = model.generate

    def timed_generate(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        result = real_generate(*a, **kw)
        gen["seconds"] += time.perf_counter() - t0
        ids = result if isinstance(result, torch.Tensor) else result.sequences
        prompt_len = (kw.get("input_ids") if kw.get("input_ids") is not None else a[0]).shape[1]
        gen["tokens"] += int((ids[:, prompt_len:] != tok.pad_token_id).sum())
        return result

    model.generate = timed_generate  # type: ignore[method-assign]
    rows: list[dict[str, float]] = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *a: Any, **kw: Any) -> None:
            self.t0 = time.perf_counter()
            gen["seconds"], gen["tokens"] = 0.0, 0

        def on_step_end(self, *a: Any, **kw: Any) -> None:
            rows.append({"step_s": time.perf_counter() - self.t0,
                         "rollout_tok_s": gen["tokens"] / max(gen["seconds"], 1e-9), "tokens": gen["tokens"]})  # fmt: skip

    def reward(completions: list[str], **_: Any) -> list[float]:
        return [float(len(c) % 2) for c in completions]

    cfg = GRPOConfig(output_dir=str(out), per_device_train_batch_size=args.prompts * args.group_size,
                     num_generations=args.group_size, max_completion_length=args.max_tokens, max_steps=args.steps,
                     temperature=1.0, beta=0.0, learning_rate=1e-6, use_cpu=True, bf16=False, report_to=[],
                     logging_steps=10**6, save_strategy="no", seed=0, dataloader_num_workers=0, shuffle_dataset=False)  # fmt: skip
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok,
                          callbacks=[Timer()])  # fmt: skip
    trainer.train()
    return rows[args.warmup :]


def benchmark(args: argparse.Namespace) -> str:
    from dsv.core.bench import host

    results: dict[str, list[dict[str, float]]] = {"dsv": [], "trl": []}
    ratios_step: list[float] = []
    ratios_tps: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = _checkpoint(root)
        for run in range(args.runs):
            per: dict[str, dict[str, float]] = {}
            for name, fn in (("dsv", run_dsv), ("trl", run_trl)) if run % 2 == 0 else (("trl", run_trl), ("dsv", run_dsv)):
                rows = fn(ckpt, root / f"{name}-{run}", args)
                per[name] = {k: statistics.median(r[k] for r in rows) for k in ("step_s", "rollout_tok_s", "tokens")}
                results[name].append(per[name])
                print(f"run {run + 1} {name}: {json.dumps(per[name])}", file=sys.stderr, flush=True)
            ratios_step.append(per["trl"]["step_s"] / per["dsv"]["step_s"])
            ratios_tps.append(per["dsv"]["rollout_tok_s"] / per["trl"]["rollout_tok_s"])
    med = {n: {k: statistics.median(r[k] for r in rs) for k in ("step_s", "rollout_tok_s", "tokens")} for n, rs in results.items()}
    lines = [
        f"### GRPO step on a CPU: dsv rl vs TRL GRPOTrainer ({datetime.date.today()})",
        "",
        f"Machine: {host()}; TRL {_version('trl')}, transformers {_version('transformers')}. tiny preset (random "
        f"weights), {args.prompts} prompts x G={args.group_size}, {args.max_tokens} completion tokens each, "
        f"{args.steps} steps per run ({args.warmup} warm-up excluded), medians of {args.runs} runs.",
        "",
        "| | GRPO step (s) | rollout tokens/s | completion tokens per step |",
        "|---|---|---|---|",
        f"| dsv rl (serve engine) | {med['dsv']['step_s']:.3f} | {med['dsv']['rollout_tok_s']:,.0f} | {med['dsv']['tokens']:.0f} |",
        f"| TRL GRPOTrainer (transformers generate) | {med['trl']['step_s']:.3f} | {med['trl']['rollout_tok_s']:,.0f} | {med['trl']['tokens']:.0f} |",
        "",
        f"Step time TRL/dsv per run: {', '.join(f'{r:.2f}x' for r in ratios_step)} (median {statistics.median(ratios_step):.2f}x); "
        f"rollout tokens/s dsv/TRL: {', '.join(f'{r:.2f}x' for r in ratios_tps)} (median {statistics.median(ratios_tps):.2f}x).",
        "",
        f"Command: `OMP_NUM_THREADS=1 python tools/bench/rl_vs_trl.py --runs {args.runs} --steps {args.steps} "
        f"--prompts {args.prompts} --group-size {args.group_size} --max-tokens {args.max_tokens}`",
    ]  # fmt: skip
    return "\n".join(lines)


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def ablation(args: argparse.Namespace, png: Path) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "packages" / "rl" / "tests"))
    from _warmstart import warm_start

    from dsv.core.plot import pyplot, save_png
    from dsv.rl import GRPOConfig, grpo

    variants = {
        "all on": {},
        "KL off (beta 0)": {"beta": 0.0},
        "OPSM off": {"opsm_delta": None},
        "Keep Routing off": {"keep_routing": False},
        "Keep Sampling Mask off": {"keep_sampling_mask": False},
    }
    curves: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = warm_start(root / "sft", "rg:aiw", steps=150, unparseable_share=0.76)
        for name, change in variants.items():
            rows: list[dict[str, Any]] = []
            base = {"beta": 0.01, "opsm_delta": 0.5, "keep_routing": True, "keep_sampling_mask": True}
            grpo(GRPOConfig(model=str(model), out=root / name.replace(" ", "_"), tasks=["rg:aiw"], steps=args.steps,
                            prompts=8, group_size=8, lr=1e-3, temperature=1.0, top_k=64, max_tokens=8,
                            eval_every=5, eval_tasks=100, save_every=0, progress=False, tensorboard=False, plot=False,
                            **{**base, **change}), on_step=rows.append)  # fmt: skip
            curves[name] = rows
            print(name, json.dumps({"eval": [r.get("eval/accuracy") for r in rows if "eval/accuracy" in r]}), file=sys.stderr)
    plt = pyplot()
    assert plt is not None, "the ablation plot needs matplotlib"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, rows in curves.items():
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["reward"] for r in rows], label=name)
        ev = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
        axes[1].plot(*zip(*ev, strict=True), marker="o", label=name)
        axes[2].plot(steps, [r["rollout_train_kl"] for r in rows], label=name)
    for ax, title in zip(axes, ("training reward (rg:aiw)", "held-out greedy accuracy", "rollout-vs-train KL"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    axes[2].set_yscale("symlog", linthresh=1e-8)
    fig.tight_layout()
    save_png(fig, png, dpi=90)
    lines = ["| variant | held-out greedy accuracy every 5 steps | mean training reward, last 5 steps | mean rollout-vs-train KL | mean route mismatch |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, rows in curves.items():
        ev = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
        lines.append(
            f"| {name} | {', '.join(f'{x:.2f}' for x in ev)} | {statistics.mean(r['reward'] for r in rows[-5:]):.3f} | "
            f"{statistics.mean(r['rollout_train_kl'] for r in rows):.2e} | {statistics.mean(r.get('route_mismatch', 0) for r in rows):.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--ablation", type=Path, default=None, help="write the stabiliser ablation PNG here instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(ablation(args, args.ablation) if args.ablation else benchmark(args))


if __name__ == "__main__":
    main()
