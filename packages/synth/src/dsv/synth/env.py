"""The environment API: tasks, scores, tool-call records and the `Environment` base class.

An environment is a family of tasks whose answers a program can check. It has
- `generate(seed, difficulty) -> Task`: deterministic per (seed, difficulty);
- `tools(task)`: typed Python callables acting on that task's world (their JSON
  schemas come from type hints and docstrings, see `dsv.synth.tools`);
- `solve(task)`: a reference solver that proves the task solvable;
- `verify(task, answer, trace) -> Score`: the program that checks an answer;
- `perturb(task, answer, rng)`: systematic wrong variants of a correct answer,
  used by tests to show the verifier rejects near misses;
- `parse_answer(text)`: the final answer extracted from model text.

Verifiers are called through `safe_verify`, which turns any exception (a wrong
answer type, a bug in a verifier) into `Score(0, False, reason)`: a bad answer
is a scored failure, never a crash.

Nothing here imports torch.
"""

from __future__ import annotations

import json
import random
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "DEFAULT_DIFFICULTY",
    "AnswerFormatError",
    "Environment",
    "Score",
    "Task",
    "TaskFormatError",
    "ToolCallRecord",
    "safe_verify",
]

DEFAULT_DIFFICULTY = 2


class TaskFormatError(ValueError):
    """A task record is malformed; the message names the offending field."""


class AnswerFormatError(ValueError):
    """Model text does not contain an answer in the expected format."""


_TASK_FIELDS: dict[str, type | tuple[type, ...]] = {
    "id": str,
    "family": str,
    "seed": int,
    "difficulty": int,
    "prompt": str,
    "tools": list,
    "state": dict,
    "answer_format": str,
}


@dataclass(frozen=True)
class Task:
    """One task instance. `state` is hidden verifier state and is never shown to the model."""

    id: str
    family: str
    seed: int
    difficulty: int
    prompt: str
    tools: list[dict]
    state: dict
    answer_format: str

    @staticmethod
    def make_id(family: str, difficulty: int, seed: int) -> str:
        """The stable task id `f"{family}-{difficulty}-{seed}"`."""
        return f"{family}-{difficulty}-{seed}"

    def to_json(self) -> dict:
        """A JSON-serialisable dict (one JSONL record)."""
        return {
            "id": self.id,
            "family": self.family,
            "seed": self.seed,
            "difficulty": self.difficulty,
            "prompt": self.prompt,
            "tools": self.tools,
            "state": self.state,
            "answer_format": self.answer_format,
        }

    @classmethod
    def from_json(cls, d: Any) -> Task:
        """Build a Task from a dict; raises `TaskFormatError` naming the missing or mistyped field."""
        if not isinstance(d, dict):
            raise TaskFormatError(f"task record must be a JSON object, got {type(d).__name__}")
        values: dict[str, Any] = {}
        for name, typ in _TASK_FIELDS.items():
            if name not in d:
                raise TaskFormatError(f"missing field {name!r}")
            value = d[name]
            # bool is an int subclass; a seed of `true` is a mistake, not a seed.
            if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
                raise TaskFormatError(
                    f"field {name!r} must be {getattr(typ, '__name__', typ)}, got {type(value).__name__}"
                )
            values[name] = value
        for i, tool in enumerate(values["tools"]):
            if not (isinstance(tool, dict) and isinstance(tool.get("function"), dict)):
                raise TaskFormatError(
                    f"field 'tools'[{i}] must be an OpenAI tool entry with a 'function' object"
                )
        return cls(**values)


@dataclass(frozen=True)
class Score:
    """A verifier's judgement: reward in [0, 1], pass/fail, and a human-readable reason."""

    reward: float
    passed: bool
    reason: str

    def __post_init__(self) -> None:
        assert 0.0 <= self.reward <= 1.0, f"reward must be in [0, 1], got {self.reward}"

    @classmethod
    def ok(cls, reason: str = "correct") -> Score:
        return cls(1.0, True, reason)

    @classmethod
    def fail(cls, reason: str, reward: float = 0.0) -> Score:
        return cls(reward, False, reason)


@dataclass
class ToolCallRecord:
    """One executed tool call: what was asked and what the environment answered."""

    name: str
    arguments: dict
    result: str


_FENCE_RE = re.compile(r"```[a-zA-Z0-9_+-]*\n(.*?)```", re.DOTALL)
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_FINAL_RE = re.compile(r"^\s*(?:final\s+answer|answer)\s*[:=]\s*(.+)$", re.IGNORECASE | re.MULTILINE)


def extract_answer_text(text: str) -> str:
    """The raw final-answer text: `<answer>..</answer>`, else the last fenced block,
    else the last `Answer: ...` line, else the last non-empty line."""
    if not isinstance(text, str):
        raise AnswerFormatError(f"expected text, got {type(text).__name__}")
    # Reasoning is never the answer; the model may write it inline in non-thinking mode.
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    tags = _ANSWER_TAG_RE.findall(text)
    if tags:
        return tags[-1].strip()
    fences = _FENCE_RE.findall(text)
    if fences:
        return fences[-1].strip()
    finals = _FINAL_RE.findall(text)
    if finals:
        return finals[-1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise AnswerFormatError("empty answer")
    return lines[-1]


def integer_answer(answer: Any) -> int | None:
    """The integer a final answer states ("42", "-7", "42."), or None when it states none."""
    text = str(answer).strip().rstrip(".")
    return int(text) if text.lstrip("-").isdigit() else None


def parse_json_or_text(raw: str) -> Any:
    """JSON if the text is JSON, else the stripped text."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, ValueError):
        return raw.strip()


class Environment(ABC):
    """Base class of every environment family (see the module docstring)."""

    name: ClassVar[str]
    domain: ClassVar[str]
    description: ClassVar[str]
    max_difficulty: ClassVar[int] = 5
    # What each difficulty level changes, shown by `dsv synth show`.
    difficulty_knobs: ClassVar[str] = ""

    @abstractmethod
    def generate(self, seed: int, difficulty: int = DEFAULT_DIFFICULTY) -> Task:
        """A task, deterministic per (seed, difficulty)."""

    def tools(self, task: Task) -> list[Callable[..., Any]]:
        """Bound, typed callables acting on this task's world (default: none)."""
        return []

    @abstractmethod
    def solve(self, task: Task) -> Any:
        """A reference answer that `verify` accepts."""

    @abstractmethod
    def verify(self, task: Task, answer: Any, trace: list[ToolCallRecord] | None = None) -> Score:
        """Check an answer (and optionally the tool-call trace)."""

    def perturb(self, task: Task, answer: Any, rng: random.Random) -> list[Any]:
        """Systematic wrong variants of a correct answer (default: type-generic ones)."""
        return generic_perturbations(answer, rng)

    def reasoning(self, task: Task) -> str | None:
        """A short worked derivation of `solve(task)`, the reasoning of a solved SFT trace in
        thinking mode; None (the default) where the family has no scripted one."""
        return None

    def parse_answer(self, text: str) -> Any:
        """The final answer in model text: the last `<answer>` tag, fenced block, `Answer:` line
        or non-empty line, decoded as JSON when it is JSON."""
        return parse_json_or_text(extract_answer_text(text))

    # ---- helpers for subclasses -------------------------------------------------
    def _check_difficulty(self, difficulty: int) -> int:
        if isinstance(difficulty, bool) or not isinstance(difficulty, int):
            raise ValueError(f"difficulty must be an integer, got {difficulty!r}")
        if not 1 <= difficulty <= self.max_difficulty:
            raise ValueError(
                f"difficulty for {self.name} must be in 1..{self.max_difficulty}, got {difficulty}"
            )
        return difficulty

    def _rng(self, seed: int, difficulty: int) -> random.Random:
        # String seeding is stable across processes (hash randomisation does not touch it).
        return random.Random(f"{self.name}/{difficulty}/{seed}")

    def _task(
        self,
        seed: int,
        difficulty: int,
        prompt: str,
        state: dict,
        answer_format: str,
        tools: list[dict] | None = None,
    ) -> Task:
        if tools is None:
            tools = _cached_schemas(self.tools(_schema_probe(self.name, seed, difficulty, state)))
        return Task(
            id=Task.make_id(self.name, difficulty, seed),
            family=self.name,
            seed=seed,
            difficulty=difficulty,
            prompt=prompt,
            tools=tools,
            state=state,
            answer_format=answer_format,
        )


# Tool schemas depend only on each function's code, name, docstring, defaults and annotations, which
# are the same for every task of a family; building them (inspect + typing) dominated generate().
_SCHEMA_CACHE: dict[Any, dict] = {}


def _copy_json(x: Any) -> Any:
    # Schemas are plain JSON (dicts, lists, scalars): a direct copy is ~5x cheaper than json or deepcopy.
    if isinstance(x, dict):
        return {k: _copy_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copy_json(v) for v in x]
    return x


def _cached_schemas(fns: list[Callable[..., Any]]) -> list[dict]:
    """`tool_schema` of each function, built once per distinct function definition; fresh dicts each call."""
    from dsv.synth.tools import tool_schema

    out: list[dict] = []
    for fn in fns:
        code = getattr(fn, "__code__", None)
        if code is None or hasattr(fn, "__signature__"):
            out.append(tool_schema(fn))
            continue
        key: Any = (
            code,
            fn.__name__,
            fn.__doc__,
            fn.__defaults__,
            tuple(sorted((fn.__kwdefaults__ or {}).items())),
            tuple(fn.__annotations__.items()),
        )
        try:
            schema = _SCHEMA_CACHE.get(key)
        except TypeError:  # an unhashable default or annotation: key on its text instead
            key = repr(key)
            schema = _SCHEMA_CACHE.get(key)
        if schema is None:
            schema = _SCHEMA_CACHE[key] = tool_schema(fn)
        out.append(_copy_json(schema))
    return out


def _schema_probe(family: str, seed: int, difficulty: int, state: dict) -> Task:
    # Tools are bound to a task; their schemas only need a task-shaped object to bind to.
    return Task(Task.make_id(family, difficulty, seed), family, seed, difficulty, "", [], state, "")


def generic_perturbations(answer: Any, rng: random.Random) -> list[Any]:
    """Near misses for common answer shapes: off-by-one numbers, dropped/duplicated/swapped list items,
    altered strings, changed dict values."""
    out: list[Any] = []
    if isinstance(answer, bool):
        out.append(not answer)
    elif isinstance(answer, int):
        out += [answer + 1, answer - 1, -answer if answer else 7, answer * 2 if answer else 3]
    elif isinstance(answer, float):
        out += [answer + 1.0, answer * 1.1 if answer else 0.5, round(answer) + 0.5]
    elif isinstance(answer, str):
        out += [
            answer + "x",
            answer[:-1] if answer else "x",
            answer[::-1] if answer[::-1] != answer else "zz" + answer,
        ]
    elif isinstance(answer, list):
        if answer:
            out.append(answer[:-1])
            out.append([*answer, answer[0]])
            if len(answer) > 1 and answer[0] != answer[-1]:
                swapped = list(answer)
                swapped[0], swapped[-1] = swapped[-1], swapped[0]
                out.append(swapped)
        else:
            out.append([0])
    elif isinstance(answer, dict):
        for key in list(answer)[:3]:
            bad = dict(answer)
            bad[key] = generic_perturbations(answer[key], rng)[0] if answer[key] is not None else 0
            out.append(bad)
        if answer:
            dropped = dict(answer)
            dropped.pop(rng.choice(list(answer)))
            out.append(dropped)
    return [p for p in out if p != answer]


def safe_verify(
    env: Environment, task: Task, answer: Any, trace: list[ToolCallRecord] | None = None
) -> Score:
    """`env.verify` that never raises: an exception becomes `Score(0, False, reason)`."""
    try:
        score = env.verify(task, answer, trace)
    except Exception as exc:  # a verifier bug or an answer of the wrong type is a scored failure
        return Score.fail(f"verifier raised {type(exc).__name__}: {exc}")
    if not isinstance(score, Score):
        return Score.fail(f"verifier returned {type(score).__name__}, not Score")
    return score
