"""``dsv synth build``: the thin CLI over ``dsv.synth.pipeline.build``.

Example::

    dsv synth build --endpoint http://127.0.0.1:8000/v1 --model deepseek-v3.2 -n 20 --out runs/synth
    dsv eval --library runs/synth/library --family <accepted name> --n 10 --endpoint ... --model ...

Re-running the same command resumes: finished proposals are skipped. Exit codes
(:mod:`dsv.cli.errors`): 0 when every proposal was answered; 3 when any could not be fetched
(the report is written; a re-run retries them); 4 when the share accepted is under
``--fail-under``; 130 on Ctrl-C, after writing the report of the proposals finished so far.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from dsv.cli.errors import ExitCode, UserError, fail, writable_dir

__all__ = ["build_command", "repo_envs_command", "search_qa_command"]

_err = Console(stderr=True)


def build_command(
    base_url: str = typer.Option(
        ..., "--endpoint", "--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1"
    ),
    model: str = typer.Option(..., "--model", help="Model name to request from the endpoint."),
    api_key: str | None = typer.Option(
        None, "--api-key", help="API key (default: $DSV_API_KEY, then $OPENAI_API_KEY, else none)."
    ),
    n: int = typer.Option(10, "-n", "--n", min=1, help="Number of proposals to request (indices 0..n-1)."),
    out: Path = typer.Option(
        Path("runs/synth"), "--out", help="Output dir: state.json, proposals/, report.*"
    ),
    library: Path | None = typer.Option(
        None, "--library", help="Library dir for accepted environments (default OUT/library)."
    ),
    seeds: int = typer.Option(3, "--seeds", min=1, help="Seeds checked per difficulty."),
    thinking: bool | None = typer.Option(
        None, "--thinking/--no-thinking", help="Ask the endpoint to think (default: its default)."
    ),
    temperature: float | None = typer.Option(
        None, "--temperature", help="Sampling temperature for proposals."
    ),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds to wait for one endpoint reply."),
    sandbox_wall: float = typer.Option(
        20.0,
        "--sandbox-wall",
        help="Wall-clock seconds for each of the four sandboxed check runs of a proposal (CPU: half).",
    ),
    fail_under: float | None = typer.Option(
        None, "--fail-under", min=0.0, max=1.0, help="Exit 4 when the share of proposals accepted is under this."
    ),
) -> None:
    """Propose environments with an LLM; keep those whose reference passes, wrong answers fail, and that are new."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    from dsv.synth.eval.client import EndpointClient
    from dsv.synth.pipeline.build import BuildConfig, ProposalOutcome, build
    from dsv.synth.pipeline.harness import default_limits

    try:
        writable_dir(out, "--out")
        if library is not None:
            writable_dir(library, "--library")
    except UserError as exc:
        fail(str(exc))
    config = BuildConfig(
        out_dir=out,
        library_dir=library,
        n=n,
        seeds=tuple(range(seeds)),
        limits=default_limits(sandbox_wall),
        thinking=thinking,
        temperature=temperature,
    )
    try:
        client = EndpointClient(base_url, model, api_key=api_key, timeout_s=timeout)
    except ImportError as exc:
        fail(str(exc), ExitCode.USAGE)
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]synth build"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[last]}"),
        TimeElapsedColumn(),
        console=_err,
        transient=False,
    ) as progress:
        bar = progress.add_task("build", total=n, last="")

        def on_start(total: int, done: int) -> None:
            progress.update(bar, total=total, completed=done, last=f"{done} done earlier" if done else "")

        def on_proposal(o: ProposalOutcome) -> None:
            progress.update(bar, advance=1 if o.finished else 0, last=f"#{o.index} {o.status}: {o.category}")

        def on_request(i: int) -> None:
            progress.update(bar, last=f"#{i}: waiting for the endpoint")

        try:
            report = build(client, config, on_start=on_start, on_proposal=on_proposal, on_request=on_request)
        except KeyboardInterrupt:
            progress.stop()
            fail(
                f"interrupted; the report of the proposals finished so far is in {out / 'report.md'}: re-run "
                "the same command to go on",
                ExitCode.INTERRUPTED,
            )
        finally:
            client.close()
    c = report["counts"]
    console = Console()
    console.print(
        f"[green]{c['accepted']} accepted[/], {c['rejected']} rejected, {c['error']} endpoint errors "
        f"-> {out / 'report.md'} (library: {config.library})"
    )
    for category, count in report["by_category"].items():
        console.print(f"  {category}: {count}")
    if c["error"]:
        first = next((p["reason"] for p in report["proposals"] if p["status"] == "error"), "")
        fail(
            f"{c['error']} of {c['total']} proposal(s) could not be fetched from the endpoint ({first}); fix the "
            "endpoint or --model and re-run the same command to retry them",
            ExitCode.ENDPOINT,
        )
    if fail_under is not None and not c["accepted"] / max(1, c["total"]) >= fail_under:
        fail(
            f"{c['accepted']} of {c['total']} proposal(s) accepted, under --fail-under {fail_under:g}",
            ExitCode.BELOW_THRESHOLD,
        )


def _progress(label: str) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        SpinnerColumn(),
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[last]}"),
        TimeElapsedColumn(),
        console=_err,
        transient=False,
    )


def _finish(report: dict[str, Any], out: Path, what: str, fail_under: float | None) -> None:
    """Print the counts; exit 3 on endpoint errors, 4 under --fail-under (as `dsv synth build` does)."""
    c = report["counts"]
    console = Console()
    console.print(
        f"[green]{c['accepted']} accepted[/], {c['rejected']} rejected, {c['error']} endpoint errors "
        f"-> {out / 'tasks.jsonl'} (report: {out / 'report.md'})"
    )
    for category, count in report["by_category"].items():
        console.print(f"  {category}: {count}")
    if c["error"]:
        rows = report.get("candidates") or report.get("items") or []
        first = next((r["reason"] for r in rows if r["status"] == "error"), "")
        fail(
            f"{c['error']} of {c['total']} {what} could not be finished for endpoint errors ({first}); fix the "
            "endpoint or --model and re-run the same command to retry them",
            ExitCode.ENDPOINT,
        )
    if fail_under is not None and not c["accepted"] / max(1, c["total"]) >= fail_under:
        fail(f"{c['accepted']} of {c['total']} {what} accepted, under --fail-under {fail_under:g}",
             ExitCode.BELOW_THRESHOLD)  # fmt: skip


def repo_envs_command(
    repos: Path = typer.Argument(..., help="A git repository, or a folder of them."),
    issues: Path = typer.Option(..., "--issues", help="JSON list of GitHub issue objects (the issues API's shape)."),
    pulls: Path | None = typer.Option(
        None, "--pulls", help="JSON list of GitHub pull-request objects; 'Fixes #N' pairs a PR's merge commit with N."
    ),
    base_url: str = typer.Option(
        ..., "--endpoint", "--base-url", help="OpenAI-compatible endpoint of the setup agent."
    ),
    model: str = typer.Option(..., "--model", help="Model name to request from the endpoint."),
    api_key: str | None = typer.Option(None, "--api-key", help="API key (default: $DSV_API_KEY, $OPENAI_API_KEY)."),
    out: Path = typer.Option(Path("runs/repo-envs"), "--out", help="Output dir: tasks.jsonl, envs/, state.json, report.*"),
    existing: list[Path] = typer.Option([], "--existing", help="Task files whose environments are not built again."),
    reruns: int = typer.Option(3, "--reruns", min=1, help="Suite runs per side (before/after the fix)."),
    setup_attempts: int = typer.Option(3, "--setup-attempts", min=1, help="Recipes the setup agent may try."),
    language: str | None = typer.Option(None, "--language", help="python or javascript (default: detected)."),
    sandbox_wall: float = typer.Option(120.0, "--sandbox-wall", min=1.0, help="Wall-clock seconds per suite run."),
    max_snapshot_mb: float = typer.Option(20.0, "--max-snapshot-mb", min=0.1, help="Largest parent tree kept."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds to wait for one endpoint reply."),
    fail_under: float | None = typer.Option(
        None, "--fail-under", min=0.0, max=1.0, help="Exit 4 when the share of candidates accepted is under this."
    ),
) -> None:
    """Build executable environments from issues and their fix commits: the tests that the fix makes pass decide."""
    import dataclasses

    from dsv.synth.eval.client import EndpointClient
    from dsv.synth.pipeline.repo_envs import (
        RepoEnvsConfig,
        RepoEnvsError,
        build_repo_envs,
        discover_candidates,
        find_repositories,
    )
    from dsv.synth.repo_env import REPO_LIMITS
    from dsv.synth.repo_langs import adapter_for

    try:
        writable_dir(out, "--out")
        if language is not None:
            adapter_for(language)
        found = find_repositories(repos)
        discover_candidates(found, issues, pulls)  # bad input files end here, before any work
    except (UserError, RepoEnvsError) as exc:
        fail(str(exc))
    except ValueError as exc:
        fail(f"--language: {exc}", ExitCode.USAGE)
    limits = dataclasses.replace(REPO_LIMITS, wall_s=sandbox_wall, cpu_s=max(1.0, sandbox_wall / 2))
    config = RepoEnvsConfig(
        out_dir=out, issues=issues, pulls=pulls, existing=tuple(existing), reruns=reruns,
        setup_attempts=setup_attempts, language=language, limits=limits, max_snapshot_mb=max_snapshot_mb,
    )  # fmt: skip
    try:
        client = EndpointClient(base_url, model, api_key=api_key, timeout_s=timeout)
    except ImportError as exc:
        fail(str(exc), ExitCode.USAGE)
    with _progress("synth repo-envs") as progress:
        bar = progress.add_task("repo-envs", total=None, last="finding candidates")

        def on_start(total: int, done: int) -> None:
            progress.update(bar, total=total, completed=done, last=f"{done} done earlier" if done else "")

        def on_begin(c: Any) -> None:
            progress.update(bar, last=f"{c.id}: setting up and running tests")

        def on_candidate(o: Any) -> None:
            progress.update(bar, advance=1 if o.finished else 0, last=f"{o.id} {o.status}: {o.category}")

        try:
            report = build_repo_envs(client, config, found, on_start=on_start, on_candidate=on_candidate,
                                     on_begin=on_begin)  # fmt: skip
        except RepoEnvsError as exc:
            progress.stop()
            fail(str(exc))
        except KeyboardInterrupt:
            progress.stop()
            fail(f"interrupted; the report of the candidates finished so far is in {out / 'report.md'}: re-run "
                 "the same command to go on", ExitCode.INTERRUPTED)  # fmt: skip
        finally:
            client.close()
    _finish(report, out, "candidate(s)", fail_under)


def search_qa_command(
    corpus: Path = typer.Argument(..., help="Folder of documents (.txt, .md, .html) to ask about."),
    base_url: str = typer.Option(
        ..., "--endpoint", "--base-url", help="OpenAI-compatible endpoint of the proposer and solver agents."
    ),
    model: str = typer.Option(..., "--model", help="Model name to request from the endpoint."),
    api_key: str | None = typer.Option(None, "--api-key", help="API key (default: $DSV_API_KEY, $OPENAI_API_KEY)."),
    n: int = typer.Option(10, "-n", "--n", min=1, help="Number of items to propose (indices 0..n-1)."),
    out: Path = typer.Option(Path("runs/search-qa"), "--out", help="Output dir: tasks.jsonl, corpus.jsonl, report.*"),
    existing: list[Path] = typer.Option([], "--existing", help="Task files whose questions are not asked again."),
    min_hops: int = typer.Option(2, "--min-hops", min=1, help="Documents the evidence must span."),
    max_turns: int = typer.Option(12, "--max-turns", min=1, help="Turns of each agent (proposer, solver)."),
    thinking: bool = typer.Option(False, "--thinking/--no-thinking", help="Ask the endpoint to think."),
    temperature: float | None = typer.Option(None, "--temperature", help="Sampling temperature of both agents."),
    timeout: float = typer.Option(300.0, "--timeout", help="Seconds to wait for one endpoint reply."),
    fail_under: float | None = typer.Option(
        None, "--fail-under", min=0.0, max=1.0, help="Exit 4 when the share of items accepted is under this."
    ),
) -> None:
    """Search-QA by simulation: a proposer asks with evidence, a solver answers with search; agreeing answers stay."""
    from dsv.synth.eval.client import EndpointClient
    from dsv.synth.pipeline.search_qa import SearchQaConfig, build_search_qa
    from dsv.synth.searchqa_env import load_documents

    try:
        writable_dir(out, "--out")
        load_documents(corpus)
        import tantivy  # noqa: F401
    except UserError as exc:
        fail(str(exc))
    except ValueError as exc:
        fail(str(exc))
    except ImportError:
        from dsv.cli.errors import install_hint

        fail(f"search-qa needs the tantivy search library: {install_hint('dsv-synth', 'search')}", ExitCode.USAGE)
    config = SearchQaConfig(
        out_dir=out, corpus_dir=corpus, n=n, min_hops=min_hops, proposer_turns=max_turns, solver_turns=max_turns,
        existing=tuple(existing), thinking=thinking, temperature=temperature,
    )  # fmt: skip
    try:
        client = EndpointClient(base_url, model, api_key=api_key, timeout_s=timeout)
    except ImportError as exc:
        fail(str(exc), ExitCode.USAGE)
    with _progress("synth search-qa") as progress:
        bar = progress.add_task("search-qa", total=n, last="")

        def on_start(total: int, done: int) -> None:
            progress.update(bar, total=total, completed=done, last=f"{done} done earlier" if done else "")

        def on_begin(i: int) -> None:
            progress.update(bar, last=f"#{i}: proposer and solver at work")

        def on_item(o: Any) -> None:
            progress.update(bar, advance=1 if o.finished else 0, last=f"#{o.index} {o.status}: {o.category}")

        try:
            report = build_search_qa(client, config, on_start=on_start, on_item=on_item, on_begin=on_begin)
        except ValueError as exc:
            progress.stop()
            fail(str(exc))
        except KeyboardInterrupt:
            progress.stop()
            fail(f"interrupted; the report of the items finished so far is in {out / 'report.md'}: re-run "
                 "the same command to go on", ExitCode.INTERRUPTED)  # fmt: skip
        finally:
            client.close()
    _finish(report, out, "item(s)", fail_under)
