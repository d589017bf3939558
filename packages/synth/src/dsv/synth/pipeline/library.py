"""The library of accepted environments and the sandboxed adapter that makes them usable.

Layout of a library directory: one ``<name>.py`` (the proposal module, verbatim) and one
``<name>.json`` manifest per environment. Both are written atomically, the module
first: the manifest is the commit marker, so an entry without one (a kill between
the two writes) does not exist.

``Library(dir).environment(name)`` returns an ``Environment`` whose every method runs
in ``dsv.synth.sandbox`` through the harness: ``generate``, ``solve``, ``verify``,
``perturb``, ``parse_answer`` and each tool call are separate sandboxed runs. Tools are
stateless per run, so a tool call replays the episode's earlier calls first and
``verify`` replays the trace, which keeps stateful environments faithful. The host
never imports the module.

Use: ``dsv eval --library DIR --family NAME``, or
``Library(dir).environment(name).generate(seed=0)`` from Python.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsv.synth.env import AnswerFormatError, Environment, Score, Task, ToolCallRecord
from dsv.synth.eval._io import atomic_write_json, atomic_write_text
from dsv.synth.pipeline.harness import HarnessError, run_harness
from dsv.synth.sandbox import Limits

__all__ = ["Library", "LibraryError", "SandboxedEnvironment"]

_NAME_RE = re.compile(r"[a-z][a-z0-9_]{1,47}")
_ADAPTER_LIMITS = Limits(cpu_s=5.0, wall_s=10.0, memory_mb=512, output_bytes=1_000_000)


class LibraryError(RuntimeError):
    """A library entry is missing or damaged, or a sandboxed call failed."""


class SandboxedEnvironment(Environment):
    """An environment whose code lives in a library file and runs only in the sandbox."""

    source: str = ""
    limits: Limits = _ADAPTER_LIMITS

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            reply = run_harness(self.source, request, limits=self.limits)
        except HarnessError as exc:
            raise LibraryError(f"{self.name}: {request['mode']}: {exc}") from None
        return reply.data

    def _ok(self, request: dict[str, Any]) -> dict[str, Any]:
        data = self._call(request)
        if not data.get("ok"):
            raise LibraryError(f"{self.name}: {data.get('reason', 'failed')}")
        return data

    def generate(self, seed: int, difficulty: int = 2) -> Task:
        """A task from the sandboxed generator."""
        return Task.from_json(self._ok({"mode": "generate", "seed": seed, "difficulty": difficulty})["task"])

    def solve(self, task: Task) -> Any:
        """The sandboxed reference answer."""
        return self._ok({"mode": "solve", "task": task.to_json()})["answer"]

    def verify(self, task: Task, answer: Any, trace: list[ToolCallRecord] | None = None) -> Score:
        """The sandboxed verifier's score (after replaying the trace's tool calls)."""
        try:
            json.dumps(answer)
        except (TypeError, ValueError):
            return Score.fail(f"answer of type {type(answer).__name__} cannot be sent to the verifier")
        request = {
            "mode": "verify",
            "task": task.to_json(),
            "answer": answer,
            "trace": [{"name": t.name, "arguments": t.arguments, "result": t.result} for t in trace or []],
        }
        score = self._ok(request)["score"]
        return Score(float(score["reward"]), bool(score["passed"]), str(score["reason"]))

    def perturb(self, task: Task, answer: Any, rng: random.Random) -> list[Any]:
        """The sandboxed wrong variants of ``answer``."""
        request = {"mode": "perturb", "task": task.to_json(), "answer": answer, "seed": rng.randrange(2**31)}
        return list(self._ok(request)["answers"])

    def parse_answer(self, text: str) -> Any:
        """The sandboxed answer parser; ``AnswerFormatError`` when it finds no answer."""
        data = self._call({"mode": "parse_answer", "text": text})
        if data.get("ok"):
            return data["answer"]
        if data.get("category") == "answer_format":
            raise AnswerFormatError(data.get("reason", "no answer"))
        raise LibraryError(f"{self.name}: {data.get('reason', 'parse_answer failed')}")

    def tools(self, task: Task) -> list[Callable[..., Any]]:
        """Host-side callables for the task's tool schemas; each call runs in the sandbox."""
        history: list[tuple[str, dict[str, Any]]] = []
        return [self._tool(schema, task, history) for schema in task.tools]

    def _tool(
        self, schema: dict[str, Any], task: Task, history: list[tuple[str, dict[str, Any]]]
    ) -> Callable[..., Any]:
        fn_schema = schema.get("function", {})
        name = str(fn_schema.get("name", "tool"))
        params = fn_schema.get("parameters", {}) or {}
        required = set(params.get("required", []))
        env = self

        def tool(**kwargs: Any) -> str:
            data = env._ok(
                {
                    "mode": "call_tool",
                    "task": task.to_json(),
                    "history": list(history),
                    "name": name,
                    "arguments": kwargs,
                }
            )
            history.append((name, kwargs))
            return str(data["result"])

        # Arguments are validated again by the real tool inside the sandbox; here the signature
        # only has to admit the schema's parameter names (typed Any so nothing is coerced twice).
        signature = [
            inspect.Parameter(
                p,
                inspect.Parameter.KEYWORD_ONLY,
                default=inspect.Parameter.empty if p in required else None,
                annotation=Any,
            )
            for p in params.get("properties", {})
            if isinstance(p, str) and p.isidentifier()
        ]
        tool.__name__ = name
        tool.__qualname__ = name
        tool.__doc__ = str(fn_schema.get("description") or name)
        tool.__signature__ = inspect.Signature(signature)  # type: ignore[attr-defined]
        tool.__annotations__ = {p.name: Any for p in signature}
        return tool


class Library:
    """A directory of accepted environments (``<name>.py`` + ``<name>.json`` each)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def names(self) -> list[str]:
        """Names of complete entries (module and manifest both present), sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.stem
            for p in self.root.glob("*.json")
            if _NAME_RE.fullmatch(p.stem) and p.with_suffix(".py").is_file()
        )

    def manifest(self, name: str) -> dict[str, Any]:
        """The manifest of entry ``name``."""
        path = self.root / f"{name}.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise LibraryError(f"library entry {name!r} in {self.root} is damaged: {exc}") from None
        if not isinstance(data, dict):
            raise LibraryError(f"library entry {name!r}: manifest is not a JSON object")
        return data

    def source(self, name: str) -> str:
        """The module source of entry ``name`` (checked against the manifest's sha256)."""
        text = (self.root / f"{name}.py").read_text(encoding="utf-8")
        want = self.manifest(name).get("sha256")
        if want and hashlib.sha256(text.encode()).hexdigest() != want:
            raise LibraryError(
                f"library entry {name!r}: {name}.py does not match its manifest (edited by hand?)"
            )
        return text

    def add(self, name: str, source: str, manifest: dict[str, Any]) -> Path:
        """Store an accepted environment; returns the manifest path."""
        if not _NAME_RE.fullmatch(name):
            raise LibraryError(f"invalid environment name {name!r}")
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.root / f"{name}.py", source)
        path = self.root / f"{name}.json"
        atomic_write_json(
            path, {**manifest, "name": name, "sha256": hashlib.sha256(source.encode()).hexdigest()}
        )
        return path

    def environment_class(self, name: str) -> type[SandboxedEnvironment]:
        """A ``SandboxedEnvironment`` subclass for entry ``name``."""
        if name not in self.names():
            raise KeyError(f"no environment {name!r} in library {self.root}")
        manifest = self.manifest(name)
        attrs = {
            "name": name,
            "domain": str(manifest.get("domain", "synthesized")),
            "description": str(manifest.get("description", "")),
            "source": self.source(name),
        }
        return type(f"Sandboxed_{name}", (SandboxedEnvironment,), attrs)

    def environment(self, name: str) -> SandboxedEnvironment:
        """An instance of entry ``name`` behind the sandboxed adapter."""
        return self.environment_class(name)()
