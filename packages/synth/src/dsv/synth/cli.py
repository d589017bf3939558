"""`dsv synth`: generate task files, list families, show one family.

    dsv synth list
    dsv synth show travel
    dsv synth generate arithmetic sql --n 100 --seed 0 --difficulty 2 --out tasks.jsonl
    dsv synth generate sudoku --n 50 --format hf --out sudoku_ds
    dsv synth list --library runs/synth/library                 # plus environments from `dsv synth build`
    dsv synth repo-envs REPOS --issues issues.json --endpoint URL --model M   # repo_issue task files
    dsv synth search-qa DOCS --endpoint URL --model M -n 20                   # search_qa task files
    dsv synth generate vowel_count arithmetic --library runs/synth/library --n 20 --out tasks.jsonl

Thin by design: each command parses, calls one library function and prints with
rich (tables fit 80 columns: one line per family, the description cut to fit; ``--json``
prints everything for scripts). User mistakes print one `error: ...` line and exit 1 (2 for
usage errors): the codes of :mod:`dsv.cli.errors`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from dsv.cli.errors import fail

__all__ = ["synth_app"]

synth_app = typer.Typer(
    help="Agentic environments: list families, show one, generate task files.", no_args_is_help=True
)
_out = Console()
_err = Console(stderr=True)


_LIBRARY_HELP = "library dir of environments accepted by `dsv synth build` (they run in the sandbox)"


@synth_app.command("list")
def list_families(
    library: Path | None = typer.Option(None, "--library", help=_LIBRARY_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the families as JSON (for scripts)."),
) -> None:
    """Table of families: domain, tools, difficulty range (and a library's accepted environments).

    Families made only by a pipeline (``repo_issue``, ``search_qa``) are listed apart, with the
    command that writes their task file.
    """
    from dsv.synth import registry
    from dsv.synth.families._reasoning_gym import available_datasets

    lib_names: list[str] = []
    if library is not None:
        try:
            lib_names = registry.library_names(library)
        except ValueError as exc:
            fail(str(exc))
    rows = []
    for name, cls in registry.families().items():
        task = cls().generate(0)
        rows.append({"family": name, "domain": cls.domain, "tools": [t["function"]["name"] for t in task.tools],
                     "max_difficulty": cls.max_difficulty, "description": cls.description})  # fmt: skip
    made = [{"family": name, "domain": cls.domain, "tools": list(getattr(cls, "tool_names", ())),
             "made_by": getattr(cls, "made_by", ""), "description": cls.description}
            for name, cls in registry.task_file_families().items()]  # fmt: skip
    lib_rows = [_library_row(library, name) for name in lib_names] if library is not None else []
    rg = available_datasets()
    if as_json:
        payload = {"families": rows, "task_file_families": made, "library": lib_rows,
                   "reasoning_gym": [f"rg:{d}" for d in rg]}  # fmt: skip
        print(json.dumps(payload, indent=1))
        return
    _out.print(_table("dsv synth families", ("family", "domain", "levels", "tools", "description"),
                      [(r["family"], r["domain"], f"1..{r['max_difficulty']}", ", ".join(r["tools"]) or "-",
                        r["description"]) for r in rows]))  # fmt: skip
    # Plain lines, not a table: the command is the point, and a table would cut it to fit.
    _out.print("made into task files by a pipeline (use them with dsv eval --tasks, dsv rl):")
    for r in made:
        _out.print(f"  {r['family']} ({r['domain']}; tools: {', '.join(r['tools'])})", highlight=False)
        _out.print(f"    {r['made_by']}", highlight=False, markup=False)
    if library is not None:
        _out.print(_table(f"accepted environments in {library} ({len(lib_rows)})",
                          ("family", "domain", "checked", "tools", "description"),
                          [(r["family"], r["domain"], r["checked"], ", ".join(r["tools"]) or "-", r["description"])
                           for r in lib_rows]))  # fmt: skip
    if rg:
        _out.print(f"plus {len(rg)} reasoning_gym datasets as rg:<name> (e.g. rg:basic_arithmetic)")


def _table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> Any:
    """A table that fits 80 columns: names never cut, tools wrap at commas, the description (last)
    is cut to one line (``--json`` has it whole)."""
    from rich.table import Table

    table = Table(title=title)
    used = 3 * len(columns) + 1  # borders and padding
    for i, col in enumerate(columns[:-1]):
        cells = [r[i] for r in rows]
        # tools wrap between names (up to 16 columns wide); every other cell keeps its whole width
        parts = [p for c in cells for p in c.split(", ")] if col == "tools" else cells
        width = max([len(col), *map(len, parts)])
        if col == "tools":
            width = max(width, min(16, max(map(len, cells), default=0)))
        table.add_column(col, width=width, no_wrap=col != "tools")
        used += width
    table.add_column(columns[-1], no_wrap=True, overflow="ellipsis", width=max(12, _out.width - used))
    for r in rows:
        table.add_row(*r)
    return table


def _library_row(library: Path, name: str) -> dict[str, Any]:
    from dsv.synth.pipeline.library import Library, LibraryError

    try:
        m = Library(library).manifest(name)
    except LibraryError as exc:
        return {"family": name, "domain": "-", "tools": [], "checked": "-", "description": f"damaged: {exc}"}
    checks = m.get("checks") or {}
    checked = f"{checks.get('tasks_checked', '?')} tasks, {checks.get('wrong_answers_checked', '?')} wrong"
    return {"family": name, "domain": str(m.get("domain", "-")), "tools": [str(t) for t in m.get("tools") or []],
            "checked": checked, "description": str(m.get("description", ""))}  # fmt: skip


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
        fail(str(exc))
    except (ValueError, ImportError, LibraryError) as exc:
        fail(str(exc))
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
        fail(f"--format must be jsonl or hf, got {fmt!r}", code=2)
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
            fail(str(exc))
        except (ValueError, ImportError, LibraryError) as exc:
            fail(str(exc))
    try:
        if fmt == "hf":
            export_hf(out, tasks)
        else:
            write_tasks(out, tasks)
    except ImportError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror or exc}")
    _out.print(f"wrote {len(tasks)} tasks ({', '.join(families)}) to {out}")


# `dsv synth build` lives with the pipeline (dsv.synth.pipeline.cli); registered here so it sits under `dsv synth`.
from dsv.synth.pipeline.cli import build_command, repo_envs_command, search_qa_command  # noqa: E402

synth_app.command("build")(build_command)
synth_app.command("repo-envs")(repo_envs_command)
synth_app.command("search-qa")(search_qa_command)
