"""The ``dsv eval`` loop: episodes over a task set, scored, appended to ``results.jsonl``, resumable.

Every (task, sample, thinking mode) is one episode keyed ``"{task_id}|{sample}|{mode}"``.
A finished episode is appended to ``OUT/results.jsonl`` (one fsynced line) the moment
it ends, so a killed run loses at most the episodes in flight; a re-run reads the
file, skips keys already done and finishes the rest, and the report is computed
from the file, so each episode counts exactly once however many runs it took.

Nothing a task set contains can crash the run. A malformed task record (reported as
``file:line``), an unknown family, an answer of the wrong type and a verifier that
raises are all scored failures with a reason. Endpoint failures (after the
client's retries) are recorded with ``status="error"`` and are retried by the next
run rather than counted as the model's mistakes.

Library use: ``run_eval(entries, factory, EvalConfig(out_dir=...), resolver)``;
the CLI is ``dsv eval`` (``dsv.synth.eval.cli``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from dsv.synth.env import Environment, Task, TaskFormatError
from dsv.synth.eval._io import JsonlAppender, read_jsonl_tolerant
from dsv.synth.eval.client import EndpointError
from dsv.synth.eval.policies import EpisodePolicy
from dsv.synth.eval.report import write_report

__all__ = [
    "EnvResolver",
    "EvalConfig",
    "TaskEntry",
    "episode_key",
    "family_entries",
    "load_task_file",
    "run_eval",
]

RESULTS_NAME = "results.jsonl"


@dataclass(frozen=True)
class TaskEntry:
    """A task to evaluate, or the reason it could not be read (then ``task`` is None)."""

    task_id: str
    family: str
    task: Task | None = None
    error: str | None = None


class PolicyFactory(Protocol):
    concurrent: bool

    def __call__(self, sample: int) -> EpisodePolicy: ...

    def describe(self) -> str: ...


@dataclass
class EvalConfig:
    """How to run an eval: output dir, samples per task, thinking mode, concurrency, episode limits."""

    out_dir: Path
    samples: int = 1
    thinking: bool = True
    concurrency: int = 1
    max_turns: int = 16
    meta: dict[str, Any] = field(default_factory=dict)


def load_task_file(path: str | Path) -> list[TaskEntry]:
    """Tasks of a JSONL file; each bad line becomes an entry with an ``error`` naming ``file:line``.

    Raises ``FileNotFoundError`` / ``IsADirectoryError`` only when the file itself cannot be read.
    """
    path = Path(path)
    entries: list[TaskEntry] = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                task = Task.from_json(json.loads(line))
            except json.JSONDecodeError as exc:
                entries.append(
                    TaskEntry(where, "?", error=f"malformed task record at {where}: invalid JSON ({exc.msg})")
                )
                continue
            except TaskFormatError as exc:
                entries.append(TaskEntry(where, "?", error=f"malformed task record at {where}: {exc}"))
                continue
            entries.append(TaskEntry(task.id, task.family, task=task))
    return entries


class EnvResolver:
    """Environment instances by family name: built-in families, then a library of synthesized ones.

    Library environments run through the sandboxed adapter (``dsv.synth.pipeline.library``),
    so their generate/tools/verify never execute in this process.
    """

    def __init__(self, library_dir: str | Path | None = None) -> None:
        self.library_dir = Path(library_dir) if library_dir else None
        self._cache: dict[str, Environment] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """Every family name this resolver knows."""
        from dsv.synth import registry

        names = set(registry.families())
        if self.library_dir is not None:
            from dsv.synth.pipeline.library import Library

            names |= set(Library(self.library_dir).names())
        return sorted(names)

    def get(self, name: str) -> Environment:
        """The environment for ``name``; ``KeyError`` with the known names when there is none."""
        with self._lock:
            if name in self._cache:
                return self._cache[name]
            from dsv.synth import registry

            env: Environment | None = None
            try:
                env = registry.get(name)
            except KeyError as exc:
                message = str(exc.args[0]) if exc.args else f"unknown family {name!r}"
                if self.library_dir is not None:
                    from dsv.synth.pipeline.library import Library

                    library = Library(self.library_dir)
                    if name in library.names():
                        env = library.environment(name)
                    else:
                        known = ", ".join(library.names()) or "none"
                        message += f"; library {self.library_dir} has: {known}"
                if env is None:
                    raise KeyError(message) from None
            self._cache[name] = env
            return env


def family_entries(
    resolver: EnvResolver, family: str, n: int, *, difficulty: int = 2, seed: int = 0
) -> list[TaskEntry]:
    """``n`` generated tasks of ``family`` (seeds ``seed..seed+n-1``); generation errors become entries."""
    env = resolver.get(family)  # an unknown --family is a usage error: let KeyError reach the CLI
    entries = []
    for s in range(seed, seed + n):
        try:
            task = env.generate(s, difficulty)
        except Exception as exc:  # a broken generator scores as a failure for that seed
            tid = Task.make_id(family, difficulty, s)
            entries.append(TaskEntry(tid, family, error=f"generate failed: {type(exc).__name__}: {exc}"))
            continue
        entries.append(TaskEntry(task.id, task.family, task=task))
    return entries


def episode_key(task_id: str, sample: int, thinking: bool) -> str:
    """The resume key of one episode."""
    return f"{task_id}|{sample}|{'thinking' if thinking else 'no-thinking'}"


def _episode(
    entry: TaskEntry, sample: int, config: EvalConfig, factory: PolicyFactory, resolver: EnvResolver
) -> dict[str, Any]:
    from dsv.synth.episode import run_episode

    record: dict[str, Any] = {
        "key": episode_key(entry.task_id, sample, config.thinking),
        "task_id": entry.task_id,
        "family": entry.family,
        "sample": sample,
        "thinking": config.thinking,
        "status": "done",
        "passed": False,
        "reward": 0.0,
        "reason": "",
        "output_tokens": 0,
        "reasoning_tokens": 0,
        "reasoning_source": "none",
        "tool_calls": 0,
        "turns": 0,
        "answer_text": None,
    }
    start = time.perf_counter()
    try:
        if entry.task is None:
            record["reason"] = entry.error or "unreadable task"
            return record
        try:
            env = resolver.get(entry.task.family)
        except KeyError as exc:
            record["reason"] = str(exc.args[0]) if exc.args else f"unknown family {entry.family!r}"
            return record
        except Exception as exc:  # e.g. a library entry whose files are damaged
            record["reason"] = f"cannot load family {entry.family!r}: {type(exc).__name__}: {exc}"
            return record
        policy = factory(sample)
        try:
            result = run_episode(env, entry.task, policy, max_turns=config.max_turns)
        except Exception as exc:  # an environment bug is this task's failure, not the run's
            record["reason"] = f"episode raised {type(exc).__name__}: {exc}"[:500]
            return record
        finally:
            record.update(
                output_tokens=policy.output_tokens,
                reasoning_tokens=policy.reasoning_tokens,
                reasoning_source=policy.reasoning_source,
            )
        if isinstance(policy.error, EndpointError):
            # the endpoint failed, not the model: retried by the next run instead of scored
            record.update(
                status="error", reason=f"endpoint error: {policy.error}"[:500], turns=int(result.turns)
            )
            return record
        score = result.score
        record.update(
            passed=bool(score.passed),
            reward=float(score.reward),
            reason=str(score.reason)[:500],
            tool_calls=int(result.tool_calls),
            turns=int(result.turns),
            answer_text=None if result.answer_text is None else str(result.answer_text)[:2000],
        )
        return record
    finally:
        record["wall_s"] = round(time.perf_counter() - start, 4)


def run_eval(
    entries: Iterable[TaskEntry],
    factory: PolicyFactory,
    config: EvalConfig,
    resolver: EnvResolver,
    *,
    on_episode: Callable[[dict[str, Any]], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run every pending episode, append each to results.jsonl, then write the report; return it.

    ``on_start(total, already_done)`` is called once before work starts and
    ``on_episode(record)`` after each episode (for a progress bar).
    """
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / RESULTS_NAME
    entries = list(entries)
    wanted = {
        episode_key(e.task_id, s, config.thinking): (e, s) for e in entries for s in range(config.samples)
    }
    done = {r["key"] for r in read_jsonl_tolerant(results_path) if r.get("status") == "done" and "key" in r}
    pending = [(e, s) for key, (e, s) in wanted.items() if key not in done]
    if on_start is not None:
        on_start(len(wanted), len(wanted) - len(pending))
    started = datetime.now(UTC).isoformat(timespec="seconds")
    write_lock = threading.Lock()
    writer = JsonlAppender(results_path)

    def finish(record: dict[str, Any]) -> None:
        with write_lock:
            writer.append(record)
        if on_episode is not None:
            on_episode(record)

    workers = max(1, config.concurrency if factory.concurrent else 1)
    try:
        if workers == 1:
            for e, s in pending:
                finish(_episode(e, s, config, factory, resolver))
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dsv-eval") as pool:
                running: set[Future[dict[str, Any]]] = set()
                # keep at most `workers` in flight so a kill loses little and memory stays flat
                for e, s in pending:
                    running.add(pool.submit(_episode, e, s, config, factory, resolver))
                    if len(running) >= workers:
                        finished, running = wait(running, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            finish(fut.result())
                for fut in running:
                    finish(fut.result())
    finally:
        writer.close()

    # the latest record per wanted key: every episode counted once, whatever the number of runs
    # (both thinking modes: running once with and once without --thinking into one dir compares them)
    reportable = {
        episode_key(e.task_id, s, m) for e in entries for s in range(config.samples) for m in (True, False)
    }
    latest: dict[str, dict[str, Any]] = {}
    for r in read_jsonl_tolerant(results_path):
        if r.get("key") in reportable:
            latest[r["key"]] = r
    meta = {
        "target": factory.describe(),
        "samples": config.samples,
        "thinking": config.thinking,
        "concurrency": workers,
        "max_turns": config.max_turns,
        "started": started,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "episodes_wanted": len(wanted),
        "episodes_reported": len(latest),
        **config.meta,
    }
    return write_report(out_dir, list(latest.values()), meta)
