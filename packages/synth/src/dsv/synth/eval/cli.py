"""``dsv eval``: score a dsv checkpoint or an OpenAI-compatible endpoint on task sets.

Examples::

    dsv eval --base-url http://127.0.0.1:8000/v1 --model deepseek-v3.2 --family arithmetic --n 50 \\
        --samples 4 --concurrency 16 --out runs/eval/arith
    dsv eval --model runs/ckpt --tasks tasks.jsonl --no-thinking --out runs/eval/ckpt

``--model`` alone is a checkpoint path evaluated in-process (needs dsv-core); with
``--base-url`` it is the endpoint's model name. Re-running with the same ``--out``
resumes: finished episodes are skipped. Results: ``OUT/results.jsonl``,
``OUT/report.json``, ``OUT/report.md``, ``OUT/accuracy_vs_tokens.png``.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

__all__ = ["eval_command"]

_err = Console(stderr=True)


def _fail(message: str, code: int = 1) -> None:
    _err.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def eval_command(
    model: str = typer.Option(
        ..., "--model", help="Checkpoint dir (in-process) or, with --base-url, the model name."
    ),
    base_url: str | None = typer.Option(None, "--base-url", help="OpenAI-compatible endpoint to evaluate."),
    api_key: str | None = typer.Option(
        None, "--api-key", help="API key (default: $DSV_API_KEY, then $OPENAI_API_KEY)."
    ),
    tasks: Path | None = typer.Option(None, "--tasks", help="Task file (JSONL, from `dsv synth generate`)."),
    family: str | None = typer.Option(
        None, "--family", help="Generate tasks from this family instead of --tasks."
    ),
    n: int = typer.Option(
        20, "--n", min=1, help="With --family: number of tasks (seeds --seed..--seed+n-1)."
    ),
    difficulty: int = typer.Option(2, "--difficulty", min=1, help="With --family: task difficulty."),
    seed: int = typer.Option(0, "--seed", help="With --family: first seed."),
    library: Path | None = typer.Option(
        None, "--library", help="Library of synthesized environments (`dsv synth build`)."
    ),
    samples: int = typer.Option(1, "--samples", min=1, help="Samples per task (k for pass@k)."),
    thinking: bool = typer.Option(True, "--thinking/--no-thinking", help="Thinking mode on or off."),
    concurrency: int = typer.Option(8, "--concurrency", min=1, help="Concurrent requests (endpoints only)."),
    max_turns: int = typer.Option(16, "--max-turns", min=1, help="Assistant turns per episode."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", min=1, help="Output token limit per turn."),
    temperature: float | None = typer.Option(None, "--temperature", min=0.0, help="Sampling temperature."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds to wait for one endpoint reply."),
    stream: bool = typer.Option(
        False, "--stream/--no-stream", help="Stream endpoint replies (SSE) and accumulate the deltas."
    ),
    out: Path = typer.Option(Path("runs/eval"), "--out", help="Output directory (resumable)."),
) -> None:
    """Accuracy, pass@k, output/reasoning tokens and tool calls of a model on task sets."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dsv.synth.eval.runner import EnvResolver, EvalConfig, family_entries, load_task_file, run_eval

    if (tasks is None) == (family is None):
        _fail("pass exactly one of --tasks FILE or --family NAME", 2)
    if stream and base_url is None:
        _fail("--stream applies to endpoints: pass --base-url too (an in-process --model is not streamed)", 2)
    if out.exists() and not out.is_dir():
        _fail(f"--out {out} is a file; pass a directory")
    if library is not None and not library.is_dir():
        _fail(f"--library {library} is not a directory (create one with `dsv synth build`)")
    resolver = EnvResolver(library)
    if tasks is not None:
        try:
            entries = load_task_file(tasks)
        except OSError as exc:
            _fail(f"cannot read --tasks {tasks}: {exc.strerror or exc}")
        source = str(tasks)
    else:
        assert family is not None
        try:
            entries = family_entries(resolver, family, n, difficulty=difficulty, seed=seed)
        except KeyError as exc:
            _fail(str(exc.args[0]) if exc.args else f"unknown family {family!r}")
        source = f"family {family} (n={n}, difficulty={difficulty}, seed={seed})"

    if base_url is not None:
        from dsv.synth.eval.client import EndpointClient
        from dsv.synth.eval.policies import EndpointPolicyFactory

        try:
            client = EndpointClient(
                base_url, model, api_key=api_key, timeout_s=timeout, max_connections=max(8, concurrency)
            )
        except ImportError as exc:
            _fail(str(exc), 2)
        factory = EndpointPolicyFactory(
            client, thinking=thinking, max_tokens=max_tokens, temperature=temperature, stream=stream
        )
    else:
        if not Path(model).exists():
            _fail(
                f"--model {model} is not a checkpoint directory; to evaluate an endpoint pass --base-url too"
            )
        from dsv.synth.eval.policies import LocalModelPolicyFactory, ModelNotAvailableError

        try:
            factory = LocalModelPolicyFactory(
                model,
                thinking=thinking,
                max_new_tokens=max_tokens or 512,
                temperature=0.6 if temperature is None else temperature,
            )
        except ModelNotAvailableError as exc:
            _fail(str(exc), 2 if "install" in str(exc) else 1)

    config = EvalConfig(
        out_dir=out,
        samples=samples,
        thinking=thinking,
        concurrency=concurrency,
        max_turns=max_turns,
        meta={"tasks_source": source},
    )
    with Progress(
        TextColumn("[bold]eval"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("acc {task.fields[acc]}"),
        TimeElapsedColumn(),
        console=_err,
    ) as progress:
        bar = progress.add_task("eval", total=None, acc="-")
        tally = {"n": 0, "ok": 0}

        def on_start(total: int, done: int) -> None:
            progress.update(bar, total=total, completed=done)

        def on_episode(record: dict) -> None:
            tally["n"] += 1
            tally["ok"] += int(bool(record.get("passed")))
            progress.update(bar, advance=1, acc=f"{tally['ok'] / tally['n']:.2f}")

        report = run_eval(entries, factory, config, resolver, on_start=on_start, on_episode=on_episode)
    console = Console()
    for mode, block in report["results"].items():
        m = block["overall"]
        passk = " ".join(f"{k}={m[k]:.3f}" for k in m if k.startswith("pass@"))
        console.print(
            f"[bold]{mode}[/]: accuracy {m['accuracy']:.3f} {passk} | output tokens mean {m['output_tokens_mean']:.1f} "
            f"p90 {m['output_tokens_p90']:.1f} | reasoning mean {m['reasoning_tokens_mean']:.1f} "
            f"({'/'.join(m['reasoning_tokens_source'])}) | tool calls/ep {m['tool_calls_per_episode']:.2f}"
            + (f" | [yellow]{m['errors']} endpoint errors (re-run to retry)[/]" if m["errors"] else "")
        )
    console.print(f"report: {out / 'report.md'}")
