"""``dsv quickstart``: the whole DeepSeek-V3.2 recipe end to end on the embedded default, one report card.

Stages, each a function of the run folder (``OUT/``) and the recipe, in order:

1. ``synth``: training and held-out task files of one exact-answer family (dsv-synth), solved
   ``arithmetic`` episodes with a calculator tool call (verified) for the SFT stage, and, when the
   family has a scripted derivation (``Environment.reasoning``), solved thinking-mode traces;
2. ``pretrain``: dense pretraining from fresh weights on the embedded corpus plus the task prompts
   (the tokenizer is trained on both, so the task text tokenizes well);
3. ``dsa-warmup``: the lightning indexer learns the dense attention (recall before/after);
4. ``dsa-sparse``: top-k selection on, every parameter trains;
5. ``sft``: the verified reference answers of the training tasks as assistant turns, the tool
   episodes (V3.2 chat encoding with DSML tool calls, non-thinking) and the thinking-mode traces;
6. ``grpo``: GRPO on the verifier's reward with the four V3.2 stabilisers (unbiased KL, off-policy
   sequence masking, Keep Routing, Keep Sampling Mask), held-out accuracy along the way;
7. ``eval``: greedy held-out accuracy of the pretrained, SFT and GRPO models with thinking on and
   off, and accuracy against output tokens;
8. ``bench``: decode-step time against context, DSA against dense, on the trained weights;
9. ``serve``: ``dsv serve`` on the result, one agent turn with a tool call through the ``openai``
   client, the server stopped;
10. ``report``: ``OUT/report.md`` with its PNGs.

Each finished stage leaves ``OUT/stages/<stage>.json`` (wall time, tokens/s, outcome, figures),
written atomically; a stage without one runs again, and the training stages continue from their
newest checkpoint, so an interrupted run (even SIGKILL) goes on where it stopped. ``--from STAGE``
redoes that stage and the ones after it; ``--only STAGE`` runs one stage on the outputs before it.

The family (``extremum`` at level 1: the largest of four two-digit numbers) is a comparison over
every number of the prompt answered by copying one of them, so neither a constant answer (about 5%
of the held-out tasks, printed in the report) nor a number copied at random (25%) solves it. It is
chosen because a fresh tiny model learns it within the CPU budget (``tools/bench/learnability.py``:
~1,000 steps of 16 answers), where ``lookup`` (find a key's record) needs several times more and
``rg:aiw`` stayed near its most common answer, and because its answers are one token (cheap GRPO
rollouts) with a running-best worked reasoning for thinking mode.

Library use::

    from dsv.rl.quickstart import quickstart
    card = quickstart("runs/quickstart", preset="tiny")
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from dsv.core.errors import DSVError

__all__ = ["PRESETS", "STAGES", "QuickstartError", "Recipe", "quickstart", "quickstart_command"]

console = Console()

STAGES = ("synth", "pretrain", "dsa-warmup", "dsa-sparse", "sft", "grpo", "eval", "bench", "serve", "report")
# The SFT stage's phases before its last (which writes OUT/sft), each in a folder of its own.
SFT_PHASE_FOLDERS = ("sft-chat", "sft-think")


class QuickstartError(DSVError):
    """The quickstart cannot run as asked (bad preset, stage name, missing earlier stage...)."""


@dataclass(frozen=True)
class Recipe:
    """Model, task family and step counts of one quickstart (see :data:`PRESETS`)."""

    model: str  # a dsv.core preset
    family: str
    difficulty: int
    train_tasks: int  # SFT's (each with and without reasoning) and GRPO's training tasks
    pretrain_prompts: int  # how many of them pretraining reads (prompts only), so the tokenizer knows them
    tool_traces: int
    eval_tasks: int
    pretrain_steps: int
    warmup_steps: int
    sparse_steps: int
    sft_chat_steps: int  # SFT phase 1: tool episodes, reasoning traces and answers in long rows
    sft_think_steps: int  # SFT phase 2: the family's reasoning traces alone, in short rows
    sft_steps: int  # SFT phase 3: the family's answers alone, in short rows
    grpo_steps: int
    micro_batch: int
    seq_len: int
    sft_micro_batch: int
    sft_seq_len: int  # a row holds a whole tool episode (its prompt carries the tool schemas: ~900 tokens)
    answer_micro_batch: int  # SFT phases 2 and 3
    answer_seq_len: int  # about one task per row, so a prompt's numbers are not read among other tasks'
    sft_lr: float
    grpo_lr: float
    prompts: int  # GRPO prompts per step
    group_size: int
    answer_tokens: int  # max tokens of an answer without thinking (GRPO and eval)
    thinking_tokens: int  # max tokens of an answer with thinking (eval)
    grpo_eval_every: int
    contexts: tuple[int, ...]  # decode benchmark

    def scaled(self, factor: float) -> Recipe:
        """The same recipe with every step count (and the held-out set) times ``factor`` (at least 2)."""
        if factor == 1.0:
            return self

        def s(n: int) -> int:
            return max(2, round(n * factor))

        grpo = s(self.grpo_steps)
        return dataclasses.replace(
            self, pretrain_steps=s(self.pretrain_steps), warmup_steps=s(self.warmup_steps),
            sparse_steps=s(self.sparse_steps), sft_chat_steps=s(self.sft_chat_steps),
            sft_think_steps=s(self.sft_think_steps), sft_steps=s(self.sft_steps),
            grpo_steps=grpo,
            eval_tasks=max(16, round(self.eval_tasks * factor)), grpo_eval_every=max(1, grpo // 2),
        )  # fmt: skip


PRESETS: dict[str, Recipe] = {
    # A few minutes on two CPU cores. GRPO at lr 3e-4 (1e-3 gave a noisy +2 to +6 points over SFT from
    # the same SFT model; 3e-4 gave +7 after 100 steps, +9 after 200, +13 after 500), judged on 400
    # held-out tasks so that a few points are beyond chance (the report's paired sign test).
    "tiny": Recipe(
        model="tiny", family="extremum", difficulty=1, train_tasks=4000, pretrain_prompts=400, tool_traces=100,
        eval_tasks=400, pretrain_steps=300,
        warmup_steps=100, sparse_steps=60, sft_chat_steps=40, sft_think_steps=100, sft_steps=350, grpo_steps=200,
        micro_batch=8, seq_len=128,
        sft_micro_batch=4, sft_seq_len=1024, answer_micro_batch=16, answer_seq_len=64, sft_lr=1e-3,
        grpo_lr=3e-4, prompts=8, group_size=8, answer_tokens=8, thinking_tokens=32, grpo_eval_every=50,
        contexts=(256, 512, 1024, 2048, 4000),
    ),
    # The GPU recipe: the ~250M-parameter preset, longer stages.
    "small": Recipe(
        model="small", family="extremum", difficulty=2, train_tasks=8000, pretrain_prompts=2000, tool_traces=500,
        eval_tasks=200, pretrain_steps=2000,
        warmup_steps=300, sparse_steps=300, sft_chat_steps=200, sft_think_steps=300, sft_steps=1000, grpo_steps=100,
        micro_batch=16,
        seq_len=256, sft_micro_batch=16, sft_seq_len=1024, answer_micro_batch=64, answer_seq_len=128, sft_lr=3e-4, grpo_lr=1e-5, prompts=16, group_size=8, answer_tokens=16, thinking_tokens=64,
        grpo_eval_every=20, contexts=(1024, 2048, 4096, 8192, 16384),
    ),
}  # fmt: skip


# ----------------------------------------------------------------------------- run state


@dataclass
class _Run:
    out: Path
    recipe: Recipe
    preset: str
    seed: int
    progress: bool

    def stage_file(self, stage: str) -> Path:
        return self.out / "stages" / f"{stage}.json"

    def done(self, stage: str) -> dict[str, Any] | None:
        path = self.stage_file(stage)
        return json.loads(path.read_text()) if path.is_file() else None

    def final(self, stage: str) -> Path:
        path = self.out / stage / "final"
        if not (path / "config.json").is_file():
            raise QuickstartError(f"{path} is missing: run the `{stage}` stage first (dsv quickstart --from {stage})")
        return path


def _record(run: _Run, stage: str, seconds: float, tokens_per_second: float | None, outcome: str,
            figures: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    from dsv.core.checkpoint import atomic_write_json

    rec = {"stage": stage, "seconds": seconds, "tokens_per_second": tokens_per_second, "outcome": outcome,
           "figures": figures}  # fmt: skip
    atomic_write_json(run.stage_file(stage), rec)
    return rec


def _train_settings(run: _Run, stage: str) -> dict[str, Any]:
    from dsv.train.trainer import list_checkpoints

    # Resume only where an interrupted run left checkpoints: a first run starts quietly at step 0.
    resume = (run.out / stage).is_dir() and bool(list_checkpoints(run.out / stage))
    return {"progress": run.progress, "tensorboard": False, "seed": run.seed, "resume": resume, "keep_last": 1}


# ----------------------------------------------------------------------------- stages


def _stage_synth(run: _Run) -> dict[str, Any]:
    from dsv.rl.data import TaskSource
    from dsv.synth import registry
    from dsv.synth.tasks import generate_tasks, write_tasks

    r = run.recipe
    t0 = time.perf_counter()
    train_tasks = generate_tasks([r.family], r.train_tasks, seed=0, difficulty=r.difficulty)
    # The held-out set is GRPO's own (seeds no training stage draws), so every stage is scored alike.
    held = TaskSource([r.family], seed=run.seed, difficulty=r.difficulty).held_out(r.eval_tasks)
    write_tasks(run.out / "tasks" / "train.jsonl", train_tasks)
    write_tasks(run.out / "tasks" / "pretrain_prompts.jsonl", train_tasks[: r.pretrain_prompts])
    write_tasks(run.out / "tasks" / "held_out.jsonl", held)
    traces = _tool_traces(r.tool_traces)
    env = registry.get(r.family)
    thoughts = _reasoning_traces(env, train_tasks[: r.train_tasks // 4])
    _write_jsonl(run.out / "tasks" / "tool_traces.jsonl", traces)
    _write_jsonl(run.out / "tasks" / "reasoning_traces.jsonl", thoughts)
    answers = Counter(str(env.solve(t)) for t in held)
    top, n = answers.most_common(1)[0]
    seconds = time.perf_counter() - t0
    figures = {"family": r.family, "train_tasks": len(train_tasks), "held_out_tasks": len(held), "tool_traces": len(traces),
               "reasoning_traces": len(thoughts), "constant_answer": top, "constant_answer_accuracy": n / len(held),
               "distinct_answers": len(answers)}  # fmt: skip
    outcome = (f"{len(train_tasks)} training + {len(held)} held-out {r.family} tasks; the best constant answer "
               f"({top}) passes {n / len(held):.0%} of the held-out ones; {len(thoughts)} solved traces with "
               f"reasoning, {len(traces)} solved arithmetic traces with a calculator call")  # fmt: skip
    return _record(run, "synth", seconds, None, outcome, figures)


TOOL_FAMILY = "arithmetic"


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    from dsv.core.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, "".join(json.dumps(x) + "\n" for x in records).encode())


def _reasoning_traces(env: Any, tasks: list[Any]) -> list[dict[str, Any]]:
    """Thinking-mode SFT conversations: the family's worked reasoning, then the reference answer,
    kept only when the verifier passes that answer (the same answers the task file trains without
    reasoning, so one run teaches both modes)."""
    from dsv.train.data import answer_text

    out = []
    for t in tasks:
        thought = env.reasoning(t)
        answer = answer_text(env.solve(t))
        if thought is None or not env.verify(t, env.parse_answer(answer)).passed:
            continue
        out.append({"messages": [
            {"role": "user", "content": f"{t.prompt}\n\n{t.answer_format}".strip()},
            {"role": "assistant", "reasoning_content": thought, "content": answer},
        ], "thinking": True})  # fmt: skip
    return out


def _tool_traces(n: int) -> list[dict[str, Any]]:
    """Solved episodes of ``arithmetic`` with a tool: the question, a calculator call on the task's
    expression, the calculator's result, the final answer; kept only when the verifier passes it."""
    from dsv.synth import registry

    env = registry.get(TOOL_FAMILY)
    out = []
    for seed in range(n):
        t = env.generate(seed, 1)
        expression = str(t.state["expression"])
        result = _agent_tool(expression)
        answer = f"Answer: {result}"
        if not env.verify(t, env.parse_answer(answer)).passed:
            continue
        call = {"id": f"call_{seed}", "type": "function",
                "function": {"name": "calculator", "arguments": json.dumps({"expression": expression})}}  # fmt: skip
        out.append({"messages": [
            {"role": "user", "content": f"{t.prompt}\n\n{t.answer_format}".strip()},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": result},
            {"role": "assistant", "content": answer},
        ], "tools": _TOOLS})  # fmt: skip
    return out


def _train_stage(run: _Run, stage: str) -> dict[str, Any]:
    """The pretraining stages (pretrain, dsa-warmup, dsa-sparse); SFT is :func:`_sft_stage`."""
    from dsv.train import TrainConfig, train

    r = run.recipe
    steps = {"pretrain": r.pretrain_steps, "dsa-warmup": r.warmup_steps, "dsa-sparse": r.sparse_steps}
    # A checkpoint every quarter of the stage: what an interrupted run continues from.
    common = dict(out=run.out / stage, micro_batch_size=r.micro_batch, seq_len=r.seq_len, steps=steps[stage],
                  save_every=max(10, steps[stage] // 4), **_train_settings(run, stage))  # fmt: skip
    prompts = str(run.out / "tasks" / "pretrain_prompts.jsonl")
    if stage == "pretrain":
        cfg = TrainConfig(stage="pretrain", model=str(_initial_model(run)), data=["default", prompts],
                          attention="dense", **common)  # fmt: skip
    else:
        # The task prompts beside the corpus: the indexer learns which keys the answers need.
        before = "pretrain" if stage == "dsa-warmup" else "dsa-warmup"
        cfg = TrainConfig(stage=stage, model=str(run.final(before)), data=["default", prompts], **common)
    s = train(cfg)
    figures = {"steps": s.steps, "tokens": s.tokens, "final_loss": s.final_loss, "val_loss": s.val_loss}
    outcome = f"loss {_first_loss(run.out / stage):.3f} -> {s.final_loss:.3f}"
    if s.val_loss is not None:
        outcome += f", validation loss {s.val_loss:.3f}"
    if s.recall_before is not None and s.recall_after is not None:
        figures.update(recall_before=s.recall_before, recall_after=s.recall_after)
        outcome += f"; indexer recall {s.recall_before:.3f} -> {s.recall_after:.3f}"
    return _record(run, stage, s.seconds, s.tokens_per_second, outcome, figures)


def _sft_stage(run: _Run) -> dict[str, Any]:
    """SFT in three phases. Phase 1 (``OUT/sft-chat``): the tool episodes, the thinking-mode traces
    and the family's answers, in rows long enough for a whole tool episode. Phase 2
    (``OUT/sft-think``, when the family has scripted reasoning): its thinking-mode traces alone, and
    phase 3 (``OUT/sft``) its answers alone, both in rows of about one task: plain packing lets a
    position attend to every task before it in its row, and in thousand-token rows the numbers of
    twenty other tasks drown the comparison (the same model learns the family in ~400 steps from one
    task per row, ``tools/bench/learnability.py``, and not in 200 steps of packed rows). The worked
    reasoning first (a running maximum, written out) lifted the answers-only accuracy after phase 3
    from 0.56 to 0.72 on the tiny recipe."""
    from dsv.train import TrainConfig, train

    r = run.recipe
    tasks = run.out / "tasks"
    chat_data = [str(tasks / "train.jsonl"), str(tasks / "tool_traces.jsonl")]
    reasoning = bool((run.done("synth") or {}).get("figures", {}).get("reasoning_traces"))
    if reasoning:
        chat_data.append(str(tasks / "reasoning_traces.jsonl"))
    # Dense attention in SFT: a row holds several conversations, and the toy's top-32 would make a
    # 30-token prompt compete with the ones before it (V3.2's top-2048 covers its post-training
    # prompts whole); served and evaluated alone, each of these prompts fits the top-k.
    settings = dict(thinking=False, attention="dense", lr=r.sft_lr, schedule="constant", weight_decay=0.0)
    chat, think = SFT_PHASE_FOLDERS
    phases = [(chat, str(run.final("dsa-sparse")), chat_data, r.sft_chat_steps, r.sft_micro_batch, r.sft_seq_len)]
    if reasoning and r.sft_think_steps:
        phases.append((think, str(run.out / phases[-1][0] / "final"), [str(tasks / "reasoning_traces.jsonl")],
                       r.sft_think_steps, r.answer_micro_batch, r.answer_seq_len))  # fmt: skip
    phases.append(("sft", str(run.out / phases[-1][0] / "final"), [str(tasks / "train.jsonl")], r.sft_steps,
                   r.answer_micro_batch, r.answer_seq_len))  # fmt: skip
    seconds = tokens = 0.0
    outcomes, figures = [], {}
    for folder, model, data, steps, micro, seq in phases:
        cfg = TrainConfig(stage="sft", model=model, data=data, steps=steps, micro_batch_size=micro, seq_len=seq,
                          out=run.out / folder, warmup_steps=max(1, steps // 10),
                          save_every=max(10, steps // 4), **settings, **_train_settings(run, folder))  # fmt: skip
        s = train(cfg)
        seconds += s.seconds
        tokens += s.tokens
        outcomes.append(f"{folder}: loss {_first_loss(run.out / folder):.3f} -> {s.final_loss:.3f}")
        figures[folder] = {"steps": s.steps, "tokens": s.tokens, "final_loss": s.final_loss, "val_loss": s.val_loss}
    figures.update(figures["sft"])
    return _record(run, "sft", seconds, tokens / max(seconds, 1e-9), "; ".join(outcomes), figures)


def _initial_model(run: _Run) -> Path:
    """Fresh weights of the recipe's preset with a tokenizer trained on the embedded corpus and the
    SFT data (``OUT/init``): the task text, numbers and answers get tokens of their own, as a real
    tokenizer's vocabulary covers the text it will see (the trainer's own tokenizer reads the first
    documents only, here the corpus)."""
    import torch

    from dsv.core.chat import encode_messages
    from dsv.core.checkpoint import save_pretrained
    from dsv.core.model import DSVForCausalLM
    from dsv.core.presets import PRESETS as MODEL_PRESETS
    from dsv.core.tokenizer import default_corpus, train_bpe

    out = run.out / "init"
    if (out / "config.json").is_file():
        return out
    texts = default_corpus(2000, seed=run.seed)
    for name in ("train.jsonl", "tool_traces.jsonl", "reasoning_traces.jsonl"):
        for record in _jsonl(run.out / "tasks" / name)[:1000]:
            if "messages" in record:
                texts.append(encode_messages(record["messages"], tools=record.get("tools"),
                                             thinking=bool(record.get("thinking"))))  # fmt: skip
            else:
                texts.append(f"{record['prompt']}\n\n{record['answer_format']}")
    cfg = MODEL_PRESETS[run.recipe.model]()
    tok = train_bpe(texts, cfg.vocab_size)
    torch.manual_seed(run.seed)
    return save_pretrained(DSVForCausalLM(cfg), tok, out)


def _loss_key(stage: str) -> str:
    # The warm-up trains only the indexer: its loss is the indexer's KL to the dense attention.
    return "indexer_loss" if stage == "dsa-warmup" else "loss"


def _first_loss(folder: Path) -> float:
    key = _loss_key(folder.name)
    return float(next((m[key] for m in _jsonl(folder / "metrics.jsonl") if key in m), float("nan")))


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _grpo_config(run: _Run) -> Any:
    from dsv.rl.trainer import GRPOConfig

    r = run.recipe
    # The four stabilisers on: unbiased KL (a small β: V3.2 weakens it for maths), off-policy sequence
    # masking, Keep Routing and Keep Sampling Mask (top-k sampling, so the kept sets are replayed).
    return GRPOConfig(
        model=str(run.final("sft")), out=run.out / "grpo", tasks=[r.family], steps=r.grpo_steps, prompts=r.prompts,
        group_size=r.group_size, lr=r.grpo_lr, seed=run.seed, difficulty=r.difficulty, temperature=1.0, top_k=64,
        max_tokens=r.answer_tokens, beta=0.01, kl="unbiased", opsm_delta=0.5, keep_routing=True,
        keep_sampling_mask=True, eval_every=r.grpo_eval_every, eval_tasks=r.eval_tasks,
        save_every=max(2, r.grpo_steps // 4), keep_last=1, resume=True, progress=run.progress, tensorboard=False,
    )  # fmt: skip


def _stage_grpo(run: _Run) -> dict[str, Any]:
    from dsv.rl.trainer import grpo

    t0 = time.perf_counter()
    summary = grpo(_grpo_config(run))
    seconds = time.perf_counter() - t0  # this run's share when it resumed an interrupted one
    history = _jsonl(run.out / "grpo" / "metrics.jsonl")
    k = max(1, len(history) // 4)
    first = sum(m["reward"] for m in history[:k]) / k
    last = sum(m["reward"] for m in history[-k:]) / k
    tokens = sum(m.get("rollout_tokens", 0.0) for m in history)
    rollout_seconds = sum(m.get("rollout_seconds", 0.0) for m in history)
    evals = [(m["step"], m["eval/accuracy"]) for m in history if "eval/accuracy" in m]
    before = summary.eval_before
    if before is None:  # a resumed run starts past step 0: measure the starting model the same way
        before = _held_out_accuracy(run)
    figures = {"steps": summary.steps, "reward_first": first, "reward_last": last, "eval_before": before,
               "eval_after": summary.eval_after, "evals": evals, "rollout_tokens": tokens,
               "reward_errors": summary.reward_errors}  # fmt: skip
    outcome = f"mean reward of the first {k} steps {first:.3f} -> last {k} {last:.3f}"
    if before is not None and summary.eval_after is not None:
        outcome += f"; held-out greedy accuracy {before:.2f} -> {summary.eval_after:.2f}"
    return _record(run, "grpo", seconds, tokens / max(rollout_seconds, 1e-9), outcome, figures)


def _held_out_accuracy(run: _Run) -> float:
    """GRPO's own held-out greedy accuracy of the SFT model (what ``grpo`` measures at step 0)."""
    from dsv.core.checkpoint import load_pretrained
    from dsv.rl.data import TaskSource
    from dsv.rl.trainer import build_engine, evaluate_accuracy

    cfg = _grpo_config(run)
    source = TaskSource(cfg.tasks, seed=cfg.seed, difficulty=cfg.difficulty, holdout=cfg.holdout)
    model, tok = load_pretrained(cfg.model)
    engine = build_engine(model.eval(), blocks=cfg.prompts * cfg.group_size * (-(-cfg.max_len // 16)) + 8)
    return float(evaluate_accuracy(engine, tok, source, source.held_out(cfg.eval_tasks), cfg)["accuracy"])


def _score(model_dir: Path, tasks: list[Any], *, thinking: bool, max_tokens: int, seed: int) -> list[dict[str, Any]]:
    """Greedy episodes of ``tasks`` on an in-process engine: (passed, output tokens, text) per task."""
    from dsv.core.checkpoint import load_pretrained
    from dsv.rl.rollout import RolloutSettings, rollout
    from dsv.rl.trainer import build_engine
    from dsv.synth import registry

    model, tok = load_pretrained(model_dir)
    model.eval()
    max_len = min(1024, int(model.config.max_position_embeddings))
    engine = build_engine(model, blocks=len(tasks) * (-(-max_len // 16)) + 8)
    settings = RolloutSettings(temperature=0.0, max_tokens=max_tokens, max_turns=1, max_len=max_len, thinking=thinking)
    outs = rollout(engine, tok, tasks, [registry.get(t.family) for t in tasks], group_size=1, settings=settings,
                   seed=seed, step=0)  # fmt: skip
    return [{"passed": bool(o.score.passed), "tokens": o.completion_tokens, "text": o.completion_text} for o in outs]


_EVAL_MODELS = (("pretrained", "dsa-sparse"), ("sft", "sft"), ("grpo", "grpo"))


def _stage_eval(run: _Run) -> dict[str, Any]:
    from dsv.synth.tasks import read_tasks

    r = run.recipe
    tasks = read_tasks(run.out / "tasks" / "held_out.jsonl")
    t0 = time.perf_counter()
    figures: dict[str, Any] = {"tasks": len(tasks), "models": {}}
    tokens = 0
    for name, stage in _EVAL_MODELS:
        folder = run.final(stage)
        per: dict[str, Any] = {}
        for thinking in (False, True):
            eps = _score(folder, tasks, thinking=thinking, max_tokens=r.thinking_tokens if thinking else r.answer_tokens,
                         seed=run.seed)  # fmt: skip
            tokens += sum(e["tokens"] for e in eps)
            per["thinking" if thinking else "no_thinking"] = {
                "accuracy": sum(e["passed"] for e in eps) / len(eps),
                "mean_output_tokens": sum(e["tokens"] for e in eps) / len(eps),
                "episodes": [[e["passed"], e["tokens"]] for e in eps],
                "sample": eps[0]["text"],
            }
        figures["models"][name] = per
    seconds = time.perf_counter() - t0
    m = figures["models"]
    acc = {k: m[k]["no_thinking"]["accuracy"] for k in m}
    figures["gain_over_pretrained"] = acc["grpo"] - acc["pretrained"]
    figures["grpo_share_of_gain"] = (acc["grpo"] - acc["sft"]) / figures["gain_over_pretrained"] if figures["gain_over_pretrained"] > 0 else None
    figures["grpo_vs_sft"] = paired_sign_test([p for p, _ in m["sft"]["no_thinking"]["episodes"]],
                                              [p for p, _ in m["grpo"]["no_thinking"]["episodes"]])  # fmt: skip
    outcome = ("held-out accuracy without thinking: pretrained {pretrained:.2f}, SFT {sft:.2f}, GRPO {grpo:.2f}".format(**acc)
               + "; with thinking: " + ", ".join(f"{k} {m[k]['thinking']['accuracy']:.2f}" for k in m))  # fmt: skip
    return _record(run, "eval", seconds, tokens / max(seconds, 1e-9), outcome, figures)


def paired_sign_test(before: list[bool], after: list[bool]) -> dict[str, Any]:
    """Whether ``after`` passes more of the same tasks than ``before`` beyond chance: the tasks only
    ``after`` passes (``gained``), only ``before`` passes (``lost``), and the exact two-sided sign test
    (McNemar's exact test) of ``gained`` against ``lost``: under "no difference" each task that changed
    is as likely to go either way, so ``p_value`` is the binomial(gained + lost, 1/2) tail."""
    if len(before) != len(after):
        raise ValueError(f"paired results need the same tasks: {len(before)} before, {len(after)} after")
    gained = sum(1 for b, a in zip(before, after, strict=True) if a and not b)
    lost = sum(1 for b, a in zip(before, after, strict=True) if b and not a)
    n, k = gained + lost, min(gained, lost)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    return {"gained": gained, "lost": lost, "p_value": p}


def _stage_bench(run: _Run) -> dict[str, Any]:
    import torch

    from dsv.core.bench import median_times
    from dsv.core.cache import DenseKVCache
    from dsv.core.checkpoint import load_pretrained
    from dsv.core.tokenizer import default_corpus

    model, tok = load_pretrained(run.final("grpo"))
    model.eval()
    cfg = model.config
    contexts = [c for c in run.recipe.contexts if c < int(cfg.max_position_embeddings)]
    t0 = time.perf_counter()
    # A real context: the embedded corpus through the trained model, prefilled once; each timed step
    # rewinds the cache to the context length and decodes the next token.
    ids: list[int] = []
    for text in default_corpus(400, seed=run.seed):
        ids += tok.encode(text)
        if len(ids) > max(contexts) + 1:
            break
    ids = ids[: max(contexts) + 1]
    cache = DenseKVCache(cfg, 1, len(ids) + 1)
    rows = []
    with torch.inference_mode():
        model(torch.tensor([ids[:-1]]), cache=cache, use_sparse=False)
        token = torch.tensor([[ids[-1]]])
        for ctx in contexts:

            def step(sparse: bool, ctx: int = ctx) -> None:
                cache._offsets.fill_(ctx)
                model(token, cache=cache, use_sparse=sparse)

            t = median_times({"dense": lambda: step(False), "dsa": lambda: step(True)}, 21, warmup=3)
            rows.append({"context": ctx, "dense_ms": t["dense"] * 1e3, "dsa_ms": t["dsa"] * 1e3})
    seconds = time.perf_counter() - t0
    last = rows[-1]
    outcome = (f"decode step at {last['context']} tokens: dense {last['dense_ms']:.2f} ms, DSA (top-{cfg.index_topk}) "
               f"{last['dsa_ms']:.2f} ms ({last['dense_ms'] / last['dsa_ms']:.2f}x)")  # fmt: skip
    return _record(run, "bench", seconds, None, outcome, {"index_topk": cfg.index_topk, "rows": rows})


def _agent_tool(expression: str) -> str:
    """The calculator of the tool traces and the served agent turn: integers, + - * // % and parentheses."""
    import ast

    node = ast.parse(expression, mode="eval")
    allowed = (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.UnaryOp,
               ast.USub)  # fmt: skip
    if not all(isinstance(n, allowed) for n in ast.walk(node)) or not all(
        isinstance(n.value, int) for n in ast.walk(node) if isinstance(n, ast.Constant)
    ):
        return f"error: not an integer expression: {expression!r}"
    # Checked above: integer constants and + - * // % only.
    return str(eval(compile(node, "<calculator>", "eval")))


_TOOLS = [{
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an integer expression with + - * // % and parentheses.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    },
}]  # fmt: skip


def _dsv_command() -> list[str]:
    exe = shutil.which("dsv", path=str(Path(sys.executable).parent)) or shutil.which("dsv")
    return [exe] if exe else [sys.executable, "-c", "from dsv.cli.main import main; main()"]


def _stage_serve(run: _Run) -> dict[str, Any]:
    import openai

    from dsv.serve.launch import free_port, wait_ready

    model_dir = run.final("grpo")
    port = free_port()
    log = (run.out / "serve.log").open("wb")
    t0 = time.perf_counter()
    proc = subprocess.Popen([*_dsv_command(), "serve", str(model_dir), "--port", str(port), "--model-name", "quickstart",
                             "--max-batch", "4", "--stats-interval", "0"], stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    transcript: list[dict[str, Any]] = []
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", proc, timeout_s=300)
        started = time.perf_counter() - t0
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        from dsv.rl.data import HELD_OUT_SEED
        from dsv.synth import registry

        task = registry.get(TOOL_FAMILY).generate(HELD_OUT_SEED, 1)  # a question no trace showed
        messages: list[dict[str, Any]] = [{"role": "user", "content": f"{task.prompt}\n\n{task.answer_format}".strip()}]
        transcript.append(messages[0])
        t1 = time.perf_counter()
        # tool_choice "required": the server forces the opening of a call and the model writes its arguments.
        first = client.chat.completions.create(model="quickstart", messages=messages, tools=_TOOLS,
                                               tool_choice="required", max_tokens=160, temperature=0)  # type: ignore[arg-type]  # fmt: skip
        msg = first.choices[0].message
        calls = msg.tool_calls or []
        assistant = {"role": "assistant", "content": msg.content or "",
                     "tool_calls": [{"id": c.id, "type": "function", "function": {"name": c.function.name,
                                     "arguments": c.function.arguments}} for c in calls]}  # fmt: skip
        transcript.append(assistant)
        messages.append(assistant)
        for c in calls:
            try:
                result = _agent_tool(json.loads(c.function.arguments).get("expression", ""))
            except (ValueError, SyntaxError, AttributeError, TypeError) as exc:
                result = f"error: {type(exc).__name__}: {exc}"
            tool_msg = {"role": "tool", "tool_call_id": c.id, "content": result}
            transcript.append(tool_msg)
            messages.append(tool_msg)
        final = client.chat.completions.create(model="quickstart", messages=messages, tools=_TOOLS,  # type: ignore[arg-type]
                                               max_tokens=16, temperature=0)  # fmt: skip
        answer = final.choices[0].message.content or ""
        transcript.append({"role": "assistant", "content": answer})
        turn_seconds = time.perf_counter() - t1
        usage = (first.usage.completion_tokens if first.usage else 0) + (final.usage.completion_tokens if final.usage else 0)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    seconds = time.perf_counter() - t0
    figures = {"tool_calls": len(calls), "answer": answer, "transcript": transcript, "startup_seconds": started,
               "turn_seconds": turn_seconds, "completion_tokens": usage, "exit_code": proc.returncode}  # fmt: skip
    outcome = (f"server up in {started:.1f}s; agent turn: {len(calls)} tool call(s), final answer {answer.strip()!r} "
               f"in {turn_seconds:.1f}s; server stopped (exit {proc.returncode})")  # fmt: skip
    return _record(run, "serve", seconds, usage / max(turn_seconds, 1e-9), outcome, figures)


def _stage_report(run: _Run) -> dict[str, Any]:
    t0 = time.perf_counter()
    path = write_report(run)
    return _record(run, "report", time.perf_counter() - t0, None, f"{path}", {"path": str(path)})


_RUNNERS: dict[str, Callable[[_Run], dict[str, Any]]] = {
    "synth": _stage_synth,
    "pretrain": lambda run: _train_stage(run, "pretrain"),
    "dsa-warmup": lambda run: _train_stage(run, "dsa-warmup"),
    "dsa-sparse": lambda run: _train_stage(run, "dsa-sparse"),
    "sft": _sft_stage,
    "grpo": _stage_grpo,
    "eval": _stage_eval,
    "bench": _stage_bench,
    "serve": _stage_serve,
    "report": _stage_report,
}


# ----------------------------------------------------------------------------- the report card


def _hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), {os.cpu_count()} CPU cores"
    threads = torch.get_num_threads()
    return f"CPU only: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, torch threads {threads}".replace("  ", " ")


def _plots(run: _Run, records: dict[str, dict[str, Any]]) -> dict[str, str]:
    from dsv.core.plot import pyplot, save_png

    plt = pyplot()
    if plt is None:
        return {}
    made: dict[str, str] = {}
    # Loss curves of the four training stages, one axis each.
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, stage in zip(axes, ("pretrain", "dsa-warmup", "dsa-sparse", "sft"), strict=True):
        key = _loss_key(stage)
        rows = [m for m in _jsonl(run.out / stage / "metrics.jsonl") if key in m]
        if rows:
            ax.plot([m["step"] for m in rows], [m[key] for m in rows])
        ax.set_title(f"{stage} loss" + (" (indexer KL)" if stage == "dsa-warmup" else ""))
        ax.set_xlabel("step")
    fig.tight_layout()
    save_png(fig, run.out / "report-loss.png", dpi=90)
    made["loss"] = "report-loss.png"

    history = _jsonl(run.out / "grpo" / "metrics.jsonl")
    if history:
        fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
        a.plot([m["step"] for m in history], [m["reward"] for m in history], label="reward (mean of G samples)")
        a.set_title("GRPO reward per step")
        a.set_xlabel("step")
        b.plot([m["step"] for m in history], [m["accuracy"] for m in history], label="rollout accuracy (sampled)")
        g = records.get("grpo", {}).get("figures", {})
        pts = [(0, g.get("eval_before"))] if g.get("eval_before") is not None else []
        pts += [tuple(p) for p in g.get("evals", [])]
        if pts:
            b.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="held-out greedy accuracy")
        b.set_title("GRPO accuracy")
        b.set_xlabel("step")
        b.legend(fontsize=7)
        a.legend(fontsize=7)
        fig.tight_layout()
        save_png(fig, run.out / "report-grpo.png", dpi=90)
        made["grpo"] = "report-grpo.png"

    ev = records.get("eval", {}).get("figures", {}).get("models")
    if ev:
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, per in ev.items():
            for mode, style in (("no_thinking", "-"), ("thinking", "--")):
                eps = per[mode]["episodes"]
                budgets = sorted({t for _, t in eps} | {1})
                # Greedy decoding: an answer that ended within b tokens is the answer a budget of b gives.
                ax.plot(budgets, [sum(p and t <= b for p, t in eps) / len(eps) for b in budgets], style,
                        drawstyle="steps-post", label=f"{name}, {mode.replace('_', ' ')}")  # fmt: skip
        const = records.get("synth", {}).get("figures", {}).get("constant_answer_accuracy")
        if const is not None:
            ax.axhline(const, color="grey", lw=0.8, ls=":", label="best constant answer")
        ax.set_xlabel("output tokens (budget)")
        ax.set_ylabel("held-out accuracy")
        ax.set_title("Accuracy vs output tokens")
        ax.legend(fontsize=7)
        fig.tight_layout()
        save_png(fig, run.out / "report-accuracy-tokens.png", dpi=90)
        made["accuracy"] = "report-accuracy-tokens.png"

    rows = records.get("bench", {}).get("figures", {}).get("rows")
    if rows:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.plot([r["context"] for r in rows], [r["dense_ms"] for r in rows], "o-", label="dense MLA")
        ax.plot([r["context"] for r in rows], [r["dsa_ms"] for r in rows], "s-",
                label=f"DSA (top-{records['bench']['figures']['index_topk']})")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (cached tokens)")
        ax.set_ylabel("ms per decoded token")
        ax.set_title("Decode step vs context, trained model")
        ax.legend()
        fig.tight_layout()
        save_png(fig, run.out / "report-decode.png", dpi=90)
        made["decode"] = "report-decode.png"
    return made


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _family_note(family: str, syn: dict[str, Any]) -> str:
    """Why the recipe trains on ``family`` and what guessing scores on it."""
    const = (f"The most frequent held-out answer (`{syn.get('constant_answer', '-')}`) passes "
             f"{_fmt(syn.get('constant_answer_accuracy'), '.0%')} of the {syn.get('held_out_tasks', '-')} held-out "
             "tasks, so a constant answer does not solve it.")  # fmt: skip
    if family != "extremum":
        return f"`{family}`. {const}"
    return (f"`{family}`: name the largest number of a list (four two-digit numbers at level 1). {const} A "
            "number of the list copied at random passes 25%: a model above that compares the numbers. It is "
            "chosen because a fresh tiny model learns it within a CPU budget (`tools/bench/learnability.py`: about "
            "1,000 steps of 16 answers), where `lookup` (the value stored under a key, DSA's own task) needs "
            "several times more and `rg:aiw` stayed at its most common answer; its answers are one token, so "
            "GRPO's rollouts are cheap, and its running-best worked reasoning gives thinking mode something to "
            "learn.")  # fmt: skip


def write_report(run: _Run) -> Path:
    """Write ``OUT/report.md`` (and its PNGs) from the stage records present; returns its path."""
    from dsv.core.checkpoint import atomic_write_bytes

    records = {s: rec for s in STAGES if (rec := run.done(s)) is not None}
    pngs = _plots(run, records)
    r = run.recipe
    fig = {s: rec.get("figures", {}) for s, rec in records.items()}
    lines = [
        "# dsv quickstart report card", "",
        f"Preset `{run.preset}` (model preset `{r.model}`), seed {run.seed}, family `{r.family}` difficulty {r.difficulty}; "
        f"hardware: {_hardware()}; torch {_torch_version()}; written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        "", "## Stages", "",
        "| stage | wall time | tokens/s | outcome |", "|---|---|---|---|",
    ]  # fmt: skip
    total = 0.0
    for s in STAGES:
        rec = records.get(s)
        if rec is None:
            lines.append(f"| {s} | - | - | {'this file' if s == 'report' else 'not run'} |")
            continue
        total += rec["seconds"]
        tps = "-" if rec["tokens_per_second"] is None else f"{rec['tokens_per_second']:,.0f}"
        lines.append(f"| {s} | {rec['seconds']:.1f} s | {tps} | {rec['outcome']} |")
    lines += [f"| **total** | {total:.0f} s ({total / 60:.1f} min) | | |", ""]

    syn = fig.get("synth", {})
    lines += ["## The task family", "", _family_note(r.family, syn), ""]
    if "loss" in pngs:
        lines += ["## Loss curves", "", f"![loss curves]({pngs['loss']})", ""]
    w = fig.get("dsa-warmup", {})
    lines += ["## Indexer recall (DSA warm-up)", "",
              f"Recall of the lightning indexer's top-k against the dense attention's, on validation rows: "
              f"before {_fmt(w.get('recall_before'))}, after {_fmt(w.get('recall_after'))}.", ""]  # fmt: skip
    g = fig.get("grpo", {})
    lines += ["## GRPO", "",
              f"{r.grpo_steps} steps, {r.prompts} prompts x G={r.group_size}, lr {r.grpo_lr}, temperature 1, top-k 64; "
              "stabilisers: unbiased KL (β 0.01), off-policy sequence masking (δ 0.5), Keep Routing, Keep Sampling Mask. "
              f"Mean reward of the first quarter of the steps {_fmt(g.get('reward_first'))} -> last quarter "
              f"{_fmt(g.get('reward_last'))}; held-out greedy accuracy {_fmt(g.get('eval_before'), '.2f')} -> "
              f"{_fmt(g.get('eval_after'), '.2f')}.", ""]  # fmt: skip
    if "grpo" in pngs:
        lines += [f"![GRPO reward and accuracy]({pngs['grpo']})", ""]
    ev = fig.get("eval", {})
    if ev.get("models"):
        lines += ["## Evaluation (held-out, greedy)", "",
                  "| model | accuracy, thinking off | output tokens | accuracy, thinking on | output tokens |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for name, per in ev["models"].items():
            off, on = per["no_thinking"], per["thinking"]
            lines.append(f"| {name} | {off['accuracy']:.2f} | {off['mean_output_tokens']:.1f} | {on['accuracy']:.2f} "
                         f"| {on['mean_output_tokens']:.1f} |")  # fmt: skip
        share, vs = ev.get("grpo_share_of_gain"), ev.get("grpo_vs_sft") or {}
        lines += ["", f"Gain over the pretrained model (thinking off): {ev['gain_over_pretrained'] * 100:+.0f} points; "
                  f"GRPO's share of it over SFT alone: {_fmt(share, '.0%')}"
                  + (f" (of the {ev['tasks']} held-out tasks GRPO passes {vs['gained']} that SFT fails and fails "
                     f"{vs['lost']} that SFT passes: exact sign test, two-sided p = {vs['p_value']:.3g}). "
                     if vs else ". ")
                  + (f"Thinking mode (budget {r.thinking_tokens} tokens): SFT trains the family's worked reasoning "
                     "before the answers alone (it lifts the answers' accuracy), but its last phase and GRPO train "
                     "answers without thinking, and a model this small then forgets the reasoning: the thinking "
                     "column shows what is left of it (the model tends to end its turn right after `<think>`)."
                     if fig.get("synth", {}).get("reasoning_traces") else
                     f"The family has no scripted reasoning, so the SFT data has none and thinking mode (budget "
                     f"{r.thinking_tokens} tokens) is scored as it is, untrained."), ""]  # fmt: skip
        if "accuracy" in pngs:
            lines += [f"![accuracy vs output tokens]({pngs['accuracy']})", ""]
    b = fig.get("bench", {})
    if b.get("rows"):
        lines += ["## Decode time vs context (trained model, DSA vs dense)", "",
                  "| context | dense ms/token | DSA ms/token | dense / DSA |", "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {x['context']:,} | {x['dense_ms']:.2f} | {x['dsa_ms']:.2f} | {x['dense_ms'] / x['dsa_ms']:.2f}x |"
                  for x in b["rows"]]  # fmt: skip
        lines += [""]
        if "decode" in pngs:
            lines += [f"![decode time vs context]({pngs['decode']})", ""]
    sv = fig.get("serve", {})
    if sv.get("transcript"):
        lines += ["## The served agent turn (`dsv serve` + the `openai` client)", "",
                  "One turn with `tool_choice=\"required\"` (the server forces the call's opening; the model writes "
                  "the arguments), the tool's result sent back, the model's final answer:", "", "```"]  # fmt: skip
        for m in sv["transcript"]:
            text = m.get("content") or ""
            if m.get("tool_calls"):
                text += " ".join(f"[call {c['function']['name']}({c['function']['arguments']})]" for c in m["tool_calls"])
            lines.append(f"{m['role']}: {text.strip()}")
        lines += ["```", ""]
    path = run.out / "report.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


# ----------------------------------------------------------------------------- the run


def quickstart(
    out: str | Path = "runs/quickstart",
    *,
    preset: str = "tiny",
    scale: float = 1.0,
    seed: int = 0,
    from_stage: str | None = None,
    only: str | None = None,
    budget_minutes: float | None = None,
    progress: bool = True,
    on_stage: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the stages not yet done (see the module docstring); returns every stage's record."""
    if preset not in PRESETS:
        raise QuickstartError(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    for name, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in STAGES:
            raise QuickstartError(f"{name} must name a stage ({', '.join(STAGES)}), got {value!r}")
    if from_stage and only:
        raise QuickstartError("give --from or --only, not both")
    if not scale > 0:
        raise QuickstartError(f"--scale must be > 0, got {scale}")
    out = Path(out).expanduser()
    recipe = PRESETS[preset].scaled(scale)
    run = _Run(out=out, recipe=recipe, preset=preset, seed=seed, progress=progress)
    settings = {"preset": preset, "scale": scale, "seed": seed, "recipe": dataclasses.asdict(recipe)}
    settings_path = out / "quickstart.json"
    if settings_path.is_file():
        saved = json.loads(settings_path.read_text())
        now = json.loads(json.dumps(settings))
        if saved != now:
            differ = [k for k in ("preset", "scale", "seed") if saved.get(k) != now[k]]
            differ += [f"recipe.{k}" for k in now["recipe"] if saved.get("recipe", {}).get(k) != now["recipe"][k]]
            raise QuickstartError(
                f"{out} holds a quickstart run with other settings ({', '.join(differ)}: preset "
                f"{saved.get('preset')}, scale {saved.get('scale')}, seed {saved.get('seed')}); choose a new --out or delete it"
            )
    else:
        from dsv.core.checkpoint import atomic_write_json

        atomic_write_json(settings_path, settings)

    todo = list(STAGES)
    if only:
        todo = [only]
    elif from_stage:
        todo = list(STAGES[STAGES.index(from_stage):])
    redo = set(todo) if (only or from_stage) else set()
    for stage in todo:
        if stage in redo:
            run.stage_file(stage).unlink(missing_ok=True)
            for folder in (stage, *SFT_PHASE_FOLDERS) if stage == "sft" else (stage,):
                if (out / folder).is_dir() and stage not in ("eval", "bench", "serve", "report"):
                    shutil.rmtree(out / folder)
    t_start = time.perf_counter()
    for stage in todo:
        if run.done(stage) is not None:
            continue
        if budget_minutes is not None and stage != "report" and time.perf_counter() - t_start > budget_minutes * 60:
            console.print(f"[yellow]the {budget_minutes:g}-minute budget is spent; `dsv quickstart --out {out}` "
                          f"continues from {stage}[/]")  # fmt: skip
            break
        console.print(f"[bold]quickstart: {stage}[/]")
        rec = _RUNNERS[stage](run)
        console.print(f"  {stage}: {rec['outcome']} ({rec['seconds']:.1f}s)")
        if on_stage is not None:
            on_stage(rec)
    return {s: rec for s in STAGES if (rec := run.done(s)) is not None}


def print_stage_table(records: dict[str, dict[str, Any]]) -> None:
    """The stage table (wall time, tokens/s, outcome) on the console."""
    table = Table(title="dsv quickstart")
    for col in ("stage", "wall time", "tokens/s", "outcome"):
        table.add_column(col, overflow="fold")
    for s in STAGES:
        rec = records.get(s)
        if rec is None:
            table.add_row(s, "-", "-", "not run")
        else:
            tps = "-" if rec["tokens_per_second"] is None else f"{rec['tokens_per_second']:,.0f}"
            table.add_row(s, f"{rec['seconds']:.1f}s", tps, rec["outcome"])
    console.print(table)


def quickstart_command(
    preset: str = typer.Option("tiny", "--preset", help="tiny (a 2-core CPU, about ten minutes) | small (the GPU recipe)."),
    out: Path = typer.Option(Path("runs/quickstart"), "--out", help="Run folder: every stage's outputs and report.md."),
    budget: float | None = typer.Option(
        None, "--budget", help="Minutes: start no new stage after this long (the next run continues there)."
    ),
    from_stage: str | None = typer.Option(None, "--from", help=f"Redo this stage and the ones after it ({', '.join(STAGES)})."),
    only: str | None = typer.Option(None, "--only", help="Run (or redo) only this stage, on the outputs of the ones before."),
    scale: float = typer.Option(1.0, "--scale", help="Multiply every stage's step count (a quick look: 0.2)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the tasks, the data order, the rollouts."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """The whole V3.2 recipe end to end on the embedded default: tasks, tokenizer, pretraining, DSA warm-up and
    sparse training, SFT, GRPO, eval, decode benchmark, a served agent turn; ends with OUT/report.md."""
    records = quickstart(out, preset=preset, scale=scale, seed=seed, from_stage=from_stage, only=only,
                         budget_minutes=budget, progress=progress)  # fmt: skip
    print_stage_table(records)
    report = Path(out) / "report.md"
    if "report" in records and report.is_file():
        console.print(f"report: {report}")
    else:
        missing = [s for s in STAGES if s not in records]
        console.print(f"not finished: {', '.join(missing)}; `dsv quickstart --out {out}` continues")
