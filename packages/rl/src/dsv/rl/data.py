"""Prompt sources for GRPO: synth families, ``rg:`` datasets and task files, as one deterministic stream.

``TaskSource(["arithmetic", "rg:leg_counting", "tasks.jsonl"], seed=0)`` mixes its sources round
robin. Which tasks step ``s`` trains on is a pure function of (seed, s), so a resumed run reads the
same prompts as an uninterrupted one and the checkpoint only needs the step. Family tasks are
generated with seeds from a training range; :meth:`TaskSource.held_out` draws from a disjoint range
(family sources) or from a tail of the file kept out of training (``holdout`` tasks per file).

Unknown family names are refused with the close names ``dsv.synth.registry`` suggests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from dsv.core.errors import DSVError
from dsv.synth.env import Environment, Task

__all__ = ["DataError", "TaskSource"]

# Held-out family tasks use seeds from here on; training seeds stay below it.
HELD_OUT_SEED = 1_000_000_000


class DataError(DSVError):
    """A --tasks source cannot be used (unknown family, unreadable task file...)."""


@dataclass
class _Source:
    name: str
    env: Environment | None  # None: tasks from a file (their families are looked up per task)
    tasks: list[Task]  # file tasks used for training
    held: list[Task]  # file tasks kept out of training


class TaskSource:
    """A deterministic, endless mixture of task sources (see the module docstring)."""

    def __init__(
        self, specs: list[str], *, seed: int = 0, difficulty: int = 1, holdout: int = 0, library: str | None = None
    ) -> None:
        from dsv.synth import registry
        from dsv.synth.registry import UnknownFamilyError
        from dsv.synth.tasks import TaskFileError, read_tasks

        if not specs:
            raise DataError("--tasks needs at least one family, rg:<dataset> or task file")
        self.seed, self.difficulty = seed, difficulty
        self.sources: list[_Source] = []
        self._envs: dict[str, Environment] = {}
        self._library = library
        for spec in specs:
            path = Path(spec).expanduser()
            if spec.endswith(".jsonl") or path.is_file():
                if not path.is_file():
                    raise DataError(f"--tasks {spec!r}: no such task file")
                try:
                    tasks = read_tasks(path)
                except (TaskFileError, OSError) as exc:
                    raise DataError(f"--tasks {spec!r}: {exc}") from None
                if len(tasks) <= holdout:
                    raise DataError(
                        f"--tasks {spec!r}: {len(tasks)} task(s), not enough to keep {holdout} out for evaluation"
                    )
                order = list(range(len(tasks)))
                random.Random(f"{seed}/{spec}").shuffle(order)
                shuffled = [tasks[i] for i in order]
                cut = len(shuffled) - holdout
                self.sources.append(_Source(spec, None, shuffled[:cut], shuffled[cut:]))
                continue
            try:
                env = registry.get(spec, library=library)
            except UnknownFamilyError as exc:
                raise DataError(f"--tasks: {exc}") from None
            except (ImportError, ValueError) as exc:  # rg: without reasoning_gym, an unknown rg dataset
                raise DataError(f"--tasks {spec!r}: {exc}") from None
            try:
                env.generate(0, difficulty)
            except ValueError as exc:
                raise DataError(f"--tasks {spec!r}: {exc}") from None
            self._envs[env.name] = env
            self.sources.append(_Source(spec, env, [], []))

    def env_for(self, task: Task) -> Environment:
        """The environment that verifies ``task`` (file tasks name their family)."""
        env = self._envs.get(task.family)
        if env is None:
            from dsv.synth import registry
            from dsv.synth.registry import UnknownFamilyError

            try:
                env = registry.get(task.family, library=self._library)
            except UnknownFamilyError as exc:
                raise DataError(f"task {task.id}: {exc}") from None
            self._envs[task.family] = env
        return env

    def _family_task(self, src: _Source, index: int, *, held_out: bool) -> Task:
        assert src.env is not None
        # Training seeds are offset by the run seed and stay below HELD_OUT_SEED; held-out seeds start
        # there, so the two never meet.
        seed = HELD_OUT_SEED + index if held_out else (self.seed * 10_000_019 + index) % HELD_OUT_SEED
        return src.env.generate(seed, self.difficulty)

    def task(self, index: int) -> Task:
        """The ``index``-th training task of the stream."""
        src = self.sources[index % len(self.sources)]
        k = index // len(self.sources)
        if src.env is not None:
            return self._family_task(src, k, held_out=False)
        epoch, pos = divmod(k, len(src.tasks))
        if epoch == 0:
            return src.tasks[pos]
        order = list(range(len(src.tasks)))
        random.Random(f"{self.seed}/{src.name}/{epoch}").shuffle(order)
        return src.tasks[order[pos]]

    def batch(self, step: int, prompts: int) -> list[Task]:
        """The ``prompts`` tasks of optimiser step ``step``."""
        return [self.task(step * prompts + j) for j in range(prompts)]

    def held_out(self, n: int) -> list[Task]:
        """``n`` tasks never trained on, spread over the sources."""
        out: list[Task] = []
        for i in range(n):
            src = self.sources[i % len(self.sources)]
            k = i // len(self.sources)
            if src.env is not None:
                out.append(self._family_task(src, k, held_out=True))
            elif k < len(src.held):
                out.append(src.held[k])
        return out
