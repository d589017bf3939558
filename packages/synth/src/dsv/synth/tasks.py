"""Task files: JSON Lines, one `Task.to_json()` record per line.

`write_tasks` is atomic (temp file in the same directory, fsync, `os.replace`), so
a crash never leaves a half-written task file. `read_tasks` reports malformed
records as `path:line: what is wrong`; with `on_bad_record="skip"` it skips them
(the skipped errors are returned by `read_tasks_report`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Literal

from dsv.synth.env import DEFAULT_DIFFICULTY, Task, TaskFormatError

__all__ = [
    "TaskFileError",
    "export_hf",
    "generate_tasks",
    "read_tasks",
    "read_tasks_report",
    "write_tasks",
]


class TaskFileError(ValueError):
    """A task file cannot be read; the message says `file:line: problem`."""


def write_tasks(path: str | os.PathLike[str], tasks: Iterable[Task]) -> int:
    """Write tasks as JSONL atomically; returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for task in tasks:
                f.write(json.dumps(task.to_json(), ensure_ascii=False, sort_keys=True))
                f.write("\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def read_tasks_report(
    path: str | os.PathLike[str], *, on_bad_record: Literal["stop", "skip"] = "stop"
) -> tuple[list[Task], list[str]]:
    """Tasks from a JSONL file plus the `file:line: problem` messages of skipped records."""
    if on_bad_record not in ("stop", "skip"):
        raise ValueError(f"on_bad_record must be 'stop' or 'skip', got {on_bad_record!r}")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TaskFileError(f"{path}: no such task file") from None
    except UnicodeDecodeError as exc:
        raise TaskFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise TaskFileError(f"{path}: cannot read ({exc.strerror})") from None
    tasks: list[Task] = []
    errors: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problem = f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})"
        else:
            try:
                tasks.append(Task.from_json(record))
                continue
            except TaskFormatError as exc:
                problem = f"{path}:{lineno}: {exc}"
        if on_bad_record == "stop":
            raise TaskFileError(problem)
        errors.append(problem)
    return tasks, errors


def read_tasks(
    path: str | os.PathLike[str], *, on_bad_record: Literal["stop", "skip"] = "stop"
) -> list[Task]:
    """Tasks from a JSONL file; a malformed record raises `TaskFileError` (`file:line: problem`) or is skipped."""
    return read_tasks_report(path, on_bad_record=on_bad_record)[0]


def generate_tasks(
    names: Sequence[str],
    n: int,
    *,
    seed: int = 0,
    difficulty: int = DEFAULT_DIFFICULTY,
    on_task: Callable[[Task], None] | None = None,
    library: str | os.PathLike[str] | None = None,
) -> list[Task]:
    """`n` tasks per family (seeds `seed .. seed+n-1`); unknown names raise `UnknownFamilyError` before any work.

    `library` adds the environments `dsv synth build` accepted into that directory; their tasks
    are generated in the sandbox (`LibraryError` if a sandboxed run fails).
    """
    from dsv.synth import registry

    envs = [registry.get(name, library=library) for name in names]
    for env in envs:
        if not 1 <= difficulty <= env.max_difficulty:
            raise ValueError(
                f"difficulty for {env.name} must be in 1..{env.max_difficulty}, got {difficulty}"
            )
    out: list[Task] = []
    for env in envs:
        for s in range(seed, seed + n):
            task = env.generate(s, difficulty)
            out.append(task)
            if on_task is not None:
                on_task(task)
    return out


def export_hf(path: str | os.PathLike[str], tasks: Sequence[Task]) -> None:
    """Save tasks as a Hugging Face `datasets` dataset (`save_to_disk`); tools/state are JSON strings."""
    try:
        import datasets
    except ImportError:
        from dsv.cli.errors import install_hint

        raise ImportError(f"--format hf needs the datasets library: {install_hint('dsv-synth', 'hf')}") from None
    rows = {
        "id": [t.id for t in tasks],
        "family": [t.family for t in tasks],
        "seed": [t.seed for t in tasks],
        "difficulty": [t.difficulty for t in tasks],
        "prompt": [t.prompt for t in tasks],
        "answer_format": [t.answer_format for t in tasks],
        # Nested, per-family shapes do not fit one Arrow schema: keep them as JSON text.
        "tools": [json.dumps(t.tools, ensure_ascii=False) for t in tasks],
        "state": [json.dumps(t.state, ensure_ascii=False) for t in tasks],
    }
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)
