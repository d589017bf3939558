"""``dsv eval``: score a dsv checkpoint or an OpenAI-compatible endpoint on task sets.

Examples::

    dsv eval --endpoint http://127.0.0.1:8000/v1 --model deepseek-v3.2 --family arithmetic --n 50 \\
        --samples 4 --concurrency 16 --out runs/eval/arith
    dsv eval --model runs/ckpt --tasks tasks.jsonl --no-thinking --out runs/eval/ckpt --fail-under 0.5

``--model`` alone is a checkpoint path evaluated in-process (needs dsv-core); with
``--endpoint`` (alias ``--base-url``) it is the endpoint's model name. Re-running with the same
``--out`` resumes: finished episodes are skipped. Results: ``OUT/results.jsonl``,
``OUT/report.json``, ``OUT/report.md``, ``OUT/accuracy_vs_tokens.png``.

Exit codes (:mod:`dsv.cli.errors`): 0 when every episode ran; 3 when any ended in an endpoint
error (unreachable, unknown model: the report is written, a re-run retries them); 4 when the
accuracy is under ``--fail-under``; 130 on Ctrl-C (finished episodes are kept).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from dsv.cli.errors import ExitCode, UserError, fail, writable_dir

__all__ = ["eval_command"]

_err = Console(stderr=True)

# The in-process token cap per turn when --max-tokens is not given (an endpoint applies its own).
LOCAL_MAX_NEW_TOKENS = 512


def eval_command(
    model: str = typer.Option(
        ..., "--model", help="Checkpoint dir (in-process) or, with --endpoint, the model name."
    ),
    base_url: str | None = typer.Option(
        None, "--endpoint", "--base-url", help="OpenAI-compatible endpoint URL to evaluate."
    ),
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
    max_tokens: int | None = typer.Option(
        None,
        "--max-tokens",
        min=1,
        help=f"Output token limit per turn [default: {LOCAL_MAX_NEW_TOKENS} in-process; the endpoint's own].",
    ),
    temperature: float | None = typer.Option(None, "--temperature", min=0.0, help="Sampling temperature."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds to wait for one endpoint reply."),
    stream: bool = typer.Option(
        False, "--stream/--no-stream", help="Stream endpoint replies (SSE) and accumulate the deltas."
    ),
    out: Path = typer.Option(Path("runs/eval"), "--out", help="Output directory (resumable)."),
    fail_under: float | None = typer.Option(
        None, "--fail-under", min=0.0, max=1.0, help="Exit 4 when the accuracy is under this (0..1)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print report.json to stdout instead of the summary."),
) -> None:
    """Accuracy, pass@k, output/reasoning tokens and tool calls of a model on task sets."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dsv.synth.eval.runner import EnvResolver, EvalConfig, family_entries, load_task_file, run_eval

    if (tasks is None) == (family is None):
        fail("pass exactly one of --tasks FILE or --family NAME", 2)
    if stream and base_url is None:
        fail("--stream applies to endpoints: pass --endpoint too (an in-process --model is not streamed)", 2)
    try:
        writable_dir(out, "--out")
    except UserError as exc:
        fail(str(exc))
    if library is not None and not library.is_dir():
        fail(f"--library {library} is not a directory (create one with `dsv synth build`)")
    resolver = EnvResolver(library)
    if tasks is not None:
        try:
            entries = load_task_file(tasks)
        except OSError as exc:
            fail(f"cannot read --tasks {tasks}: {exc.strerror or exc}")
        source = str(tasks)
    else:
        assert family is not None
        try:
            entries = family_entries(resolver, family, n, difficulty=difficulty, seed=seed)
        except KeyError as exc:
            fail(str(exc.args[0]) if exc.args else f"unknown family {family!r}")
        source = f"family {family} (n={n}, difficulty={difficulty}, seed={seed})"

    if base_url is not None:
        from dsv.synth.eval.client import EndpointClient
        from dsv.synth.eval.policies import EndpointPolicyFactory

        try:
            client = EndpointClient(
                base_url, model, api_key=api_key, timeout_s=timeout, max_connections=max(8, concurrency)
            )
        except ImportError as exc:
            fail(str(exc), 2)
        factory = EndpointPolicyFactory(
            client, thinking=thinking, max_tokens=max_tokens, temperature=temperature, stream=stream
        )
    else:
        if not Path(model).exists():
            fail(
                f"--model {model} is not a checkpoint directory; to evaluate an endpoint pass --endpoint too"
            )
        from dsv.synth.eval.policies import LocalModelPolicyFactory, ModelNotAvailableError

        try:
            factory = LocalModelPolicyFactory(
                model,
                thinking=thinking,
                max_new_tokens=max_tokens or LOCAL_MAX_NEW_TOKENS,
                temperature=0.6 if temperature is None else temperature,
            )
        except ModelNotAvailableError as exc:
            fail(str(exc), 2 if "install" in str(exc) else 1)

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

        try:
            report = run_eval(entries, factory, config, resolver, on_start=on_start, on_episode=on_episode)
        except KeyboardInterrupt:
            progress.stop()
            fail(
                f"interrupted; {tally['n']} finished episode(s) are kept in {out / 'results.jsonl'}: re-run the "
                "same command to finish",
                ExitCode.INTERRUPTED,
            )
        except OSError as exc:
            progress.stop()
            fail(f"cannot write the results in --out {out}: {exc.strerror or exc}")
    console = Console(soft_wrap=True)
    mode = "thinking" if thinking else "no-thinking"
    if as_json:
        print(json.dumps(report, indent=1))
    for name, block in ({} if as_json else report["results"]).items():
        m = block["overall"]
        passk = " ".join(f"{k}={m[k]:.3f}" for k in m if k.startswith("pass@"))
        console.print(
            f"[bold]{name}[/]: accuracy {m['accuracy']:.3f} {passk} | output tokens mean {m['output_tokens_mean']:.1f} "
            f"p90 {m['output_tokens_p90']:.1f} | reasoning mean {m['reasoning_tokens_mean']:.1f} "
            f"({'/'.join(m['reasoning_tokens_source'])}) | tool calls/ep {m['tool_calls_per_episode']:.2f}"
            + (f" | [yellow]{m['errors']} endpoint errors (re-run to retry)[/]" if m["errors"] else "")
        )
    if not as_json:
        console.print(f"report: {out / 'report.md'}")
    this_run = report["results"].get(mode, {}).get("overall")
    if this_run is None:
        return
    if this_run["errors"]:
        first = next((r for r in this_run["failure_reasons"] if r.startswith("endpoint error")), "endpoint error")
        fail(
            f"{this_run['errors']} of {this_run['episodes']} episode(s) ended in an endpoint error ({first}); "
            "fix the endpoint or --model and re-run the same command to retry them",
            ExitCode.ENDPOINT,
        )
    if fail_under is not None and not this_run["accuracy"] >= fail_under:
        fail(
            f"accuracy {this_run['accuracy']:.3f} ({mode}) is under --fail-under {fail_under:g}",
            ExitCode.BELOW_THRESHOLD,
        )
