"""Adapter: a reasoning_gym dataset as a dsv environment (`rg:<dataset_name>`).

Only used when `reasoning_gym` is installed (`pip install dsv-synth[rg]`). The
task is reasoning_gym's entry for (seed, index 0) with its `question` as the
prompt; verification is reasoning_gym's own `score_answer`, with `passed` meaning
a score of 1. Difficulty is not mapped onto reasoning_gym's per-dataset knobs:
the dataset's default configuration is used and `difficulty` is recorded only.
"""

from __future__ import annotations

import functools
import random
from typing import Any

from dsv.synth.env import DEFAULT_DIFFICULTY, Environment, Score, Task, ToolCallRecord, extract_answer_text

__all__ = ["reasoning_gym_env"]


def _require() -> Any:
    try:
        import reasoning_gym
    except ImportError:
        from dsv.cli.errors import MissingExtra, install_hint

        raise MissingExtra(f"rg:<dataset> families need reasoning_gym: {install_hint('dsv-synth', 'rg')}") from None
    return reasoning_gym


def available_datasets() -> list[str]:
    """reasoning_gym dataset names (empty when it is not installed)."""
    try:
        _require()
    except ImportError:
        return []
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


class ReasoningGymEnv(Environment):
    """One reasoning_gym dataset, wrapped."""

    domain = "reasoning_gym"
    max_difficulty = 5

    def __init__(self, dataset: str) -> None:
        self.dataset = dataset
        self.name = f"rg:{dataset}"
        self.description = f"reasoning_gym dataset {dataset!r}, scored by reasoning_gym's score_answer"

    @functools.lru_cache(maxsize=256)  # noqa: B019 - a few envs, tasks regenerate identically per seed
    def _data(self, seed: int) -> Any:
        return _require().create_dataset(self.dataset, seed=seed, size=1)

    def generate(self, seed: int, difficulty: int = DEFAULT_DIFFICULTY) -> Task:
        d = self._check_difficulty(difficulty)
        entry = self._data(seed)[0]
        state = {"dataset": self.dataset, "answer": entry["answer"]}
        return Task(
            id=Task.make_id(self.name, d, seed),
            family=self.name,
            seed=seed,
            difficulty=d,
            prompt=entry["question"],
            tools=[],
            state=state,
            answer_format="Finish with `<answer>...</answer>` around the final answer only.",
        )

    def parse_answer(self, text: str) -> Any:
        return extract_answer_text(text)

    def solve(self, task: Task) -> Any:
        return task.state["answer"]

    def verify(self, task: Task, answer: Any, trace: list[ToolCallRecord] | None = None) -> Score:
        data = self._data(task.seed)
        entry = data[0]
        if not isinstance(answer, str):
            answer = str(answer) if answer is not None else ""
        reward = float(data.score_answer(answer, entry))
        reward = min(1.0, max(0.0, reward))
        return Score(reward, reward >= 1.0, "reasoning_gym score_answer")

    def perturb(self, task: Task, answer: Any, rng: random.Random) -> list[Any]:
        return [answer + "0", "", answer[::-1] if answer[::-1] != answer else answer + "x"]


def reasoning_gym_env(dataset: str) -> ReasoningGymEnv:
    """The environment for reasoning_gym dataset `dataset`; raises UnknownFamilyError with close matches."""
    import difflib

    from dsv.synth.registry import UnknownFamilyError

    names = available_datasets()
    if not names:
        _require()
    if dataset not in names:
        close = [f"rg:{n}" for n in difflib.get_close_matches(dataset, names, n=3, cutoff=0.5)]
        raise UnknownFamilyError(f"rg:{dataset}", close)
    return ReasoningGymEnv(dataset)
