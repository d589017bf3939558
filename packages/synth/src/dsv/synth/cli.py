"""`dsv synth`: generate task files, list families, show one family.

    dsv synth list
    dsv synth show travel
    dsv synth generate arithmetic sql --n 100 --seed 0 --difficulty 2 --out tasks.jsonl
    dsv synth generate sudoku --n 50 --format hf --out sudoku_ds
    dsv synth list --library runs/synth/library                 # plus environments from `dsv synth build`
    dsv synth generate vowel_count arithmetic --library runs/synth/library --n 20 --out tasks.jsonl

Thin by design: each command parses, calls one library function and prints with
rich. User mistakes print one `error: ...` line and exit 1 (2 for usage errors).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

__all__ = ["synth_app"]

synth_app = typer.Typer(
    help="Agentic environments: list families, show one, generate task files.", no_args_is_help=True
)
_out = Console()
_err = Console(stderr=True)


def _fail(message: str, code: int = 1) -> None:
    _err.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


_LIBRARY_HELP = "library dir of environments accepted by `dsv synth build` (they run in the sandbox)"


@synth_app.command("list")
def list_families(
    library: Path | None = typer.Option(None, "--library", help=_LIBRARY_HELP),
) -> None:
    """Table of families: domain, tools, difficulty range (and a library's accepted environments)."""
    from rich.table import Table

    from dsv.synth import registry

    lib_names: list[str] = []
    if library is not None:
        try:
            lib_names = registry.library_names(library)
        except ValueError as exc:
            _fail(str(exc))
    table = Table(title="dsv synth families")
    for col in ("family", "domain", "tools", "difficulty", "description"):
        table.add_column(col)
    for name, cls in registry.families().items():
        env = cls()
        task = env.generate(0)
        tools = ", ".join(t["function"]["name"] for t in task.tools) or "-"
        table.add_row(name, cls.domain, tools, f"1..{cls.max_difficulty}", cls.description)
    _out.print(table)
    if library is not None:
        _print_library(library, lib_names)
    from dsv.synth.families._reasoning_gym import available_datasets

    n_rg = len(available_datasets())
    if n_rg:
        _out.print(f"plus {n_rg} reasoning_gym datasets as rg:<name> (e.g. rg:basic_arithmetic)")


def _print_library(library: Path, names: list[str]) -> None:
    from rich.table import Table

    from dsv.synth.pipeline.library import Library, LibraryError

    table = Table(title=f"accepted environments in {library} ({len(names)})")
    for col in ("family", "domain", "tools", "checked", "description"):
        table.add_column(col)
    lib = Library(library)
    for name in names:
        try:
            m = lib.manifest(name)
        except LibraryError as exc:
            table.add_row(name, "-", "-", "-", f"damaged: {exc}")
            continue
        checks = m.get("checks") or {}
        checked = (
            f"{checks.get('tasks_checked', '?')} tasks, {checks.get('wrong_answers_checked', '?')} wrong"
        )
        tools = ", ".join(str(t) for t in m.get("tools") or []) or "-"
        table.add_row(name, str(m.get("domain", "-")), tools, checked, str(m.get("description", "")))
    _out.print(table)


@synth_app.command("show")
def show(
    family: str = typer.Argument(..., help="family name (see `dsv synth list`)"),
    seed: int = typer.Option(0, help="seed of the example task"),
    difficulty: int = typer.Option(2, help="difficulty of the example task"),
    library: Path | None = typer.Option(None, "--library", help=_LIBRARY_HELP),
) -> None:
    """Description, tools with their JSON schemas, one example task and its reference solution."""
    from rich.panel import Panel
    from rich.syntax import Syntax

    from dsv.synth import registry, safe_verify
    from dsv.synth.pipeline.library import LibraryError

    try:
        env = registry.get(family, library=library)
        task = env.generate(seed, difficulty)
        answer = env.solve(task)
    except registry.UnknownFamilyError as exc:
        _fail(str(exc))
    except (ValueError, ImportError, LibraryError) as exc:
        _fail(str(exc))
    _out.print(f"[bold]{env.name}[/] ({env.domain}) — {env.description}")
    knobs = getattr(env, "difficulty_knobs", "")
    if knobs:
        _out.print(f"difficulty 1..{env.max_difficulty}: {knobs}")
    for tool in task.tools:
        _out.print(Syntax(json.dumps(tool["function"], indent=2), "json", word_wrap=True))
    _out.print(Panel(task.prompt, title=f"task {task.id}"))
    _out.print(f"answer format: {task.answer_format}")
    _out.print(
        Panel(json.dumps(answer, indent=1) if not isinstance(answer, str) else answer, title="reference")
    )
    _out.print(f"verifier: {safe_verify(env, task, answer)}")


@synth_app.command("generate")
def generate(
    families: list[str] = typer.Argument(..., help="one or more family names"),
    n: int = typer.Option(10, "--n", min=1, help="tasks per family"),
    seed: int = typer.Option(0, "--seed", help="first seed; task i uses seed+i"),
    difficulty: int = typer.Option(2, "--difficulty", help="1..5 (family-specific knobs)"),
    out: Path = typer.Option(..., "--out", help="output: a .jsonl file, or a directory for --format hf"),
    fmt: str = typer.Option("jsonl", "--format", help="jsonl or hf (Hugging Face datasets save_to_disk)"),
    library: Path | None = typer.Option(None, "--library", help=_LIBRARY_HELP),
) -> None:
    """Generate tasks (with hidden verifier state) into a JSONL file or a Hugging Face dataset."""
    from rich.progress import Progress

    from dsv.synth.pipeline.library import LibraryError
    from dsv.synth.registry import UnknownFamilyError
    from dsv.synth.tasks import export_hf, generate_tasks, write_tasks

    if fmt not in ("jsonl", "hf"):
        _fail(f"--format must be jsonl or hf, got {fmt!r}", code=2)
    with Progress(console=_err, transient=True) as progress:
        bar = progress.add_task("generating", total=n * len(families))
        try:
            tasks = generate_tasks(
                families,
                n,
                seed=seed,
                difficulty=difficulty,
                on_task=lambda _t: progress.advance(bar),
                library=library,
            )
        except UnknownFamilyError as exc:
            _fail(str(exc))
        except (ValueError, ImportError, LibraryError) as exc:
            _fail(str(exc))
    try:
        if fmt == "hf":
            export_hf(out, tasks)
        else:
            write_tasks(out, tasks)
    except ImportError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"cannot write {out}: {exc.strerror or exc}")
    _out.print(f"wrote {len(tasks)} tasks ({', '.join(families)}) to {out}")


# `dsv synth build` lives with the pipeline (dsv.synth.pipeline.cli); registered here so it sits under `dsv synth`.
from dsv.synth.pipeline.cli import build_command  # noqa: E402

synth_app.command("build")(build_command)
