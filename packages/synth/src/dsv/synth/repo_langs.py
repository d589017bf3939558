"""Language support for repository environments: which files are tests, how a run varies, how results read.

A repository environment (``dsv.synth.repo_env``) runs a project's own test suite in the
sandbox with the install and test commands its setup recipe names. Everything that depends
on the language sits behind ``LanguageAdapter``:

- ``detect(paths)``: how strongly a file list looks like a project in this language;
- ``is_test_file(path)``: which changed files of a fix are its tests (they become the hidden tests);
- ``manifest_files``: files worth showing the setup agent (``pyproject.toml``, ``package.json``...);
- ``rerun_env(i)``: environment variables of rerun ``i``, chosen to shake out order dependence
  (Python varies ``PYTHONHASHSEED``, so a test that depends on set or dict order of strings changes
  outcome between reruns deterministically instead of by luck);
- ``parse_results(output)``: per-test outcomes (``pass``/``fail``/``skip``) from the suite's output.

Python reads ``unittest -v`` and ``pytest -rA`` output; JavaScript reads the TAP that
``node --test`` prints (nested subtests are named ``parent > child``). Java (JUnit's
plain reports) can follow by adding an adapter and listing it in ``ADAPTERS``.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import PurePosixPath
from typing import ClassVar, Literal

__all__ = [
    "ADAPTERS",
    "JavaScriptAdapter",
    "LanguageAdapter",
    "Outcome",
    "PythonAdapter",
    "adapter_for",
    "detect_language",
    "parse_pytest",
    "parse_tap",
    "parse_unittest",
]

Outcome = Literal["pass", "fail", "skip"]


class LanguageAdapter(ABC):
    """What repository environments need to know about one language (see the module docstring)."""

    name: ClassVar[str]
    extensions: ClassVar[tuple[str, ...]]
    manifest_files: ClassVar[tuple[str, ...]]
    # Shown to the setup agent: which test command output the parser understands.
    output_hint: ClassVar[str]

    def detect(self, paths: Iterable[str]) -> int:
        """A score: manifest files weigh 10, each source file 1 (0: not this language)."""
        score = 0
        for p in paths:
            name = PurePosixPath(p).name
            if name in self.manifest_files:
                score += 10
            elif name.endswith(self.extensions):
                score += 1
        return score

    @abstractmethod
    def is_test_file(self, path: str) -> bool:
        """Whether ``path`` holds tests (a fix's changes to such files become the hidden tests)."""

    def rerun_env(self, rerun: int) -> dict[str, str]:
        """Environment variables for rerun number ``rerun`` (default: none)."""
        return {}

    @abstractmethod
    def parse_results(self, output: str) -> dict[str, Outcome]:
        """Test id -> outcome from the test command's combined stdout and stderr."""


# ---- Python ---------------------------------------------------------------------------------

# "test_add (test_calc.TestCalc.test_add) ... ok"; a docstring's first line may sit between the
# name and the dots on its own line.
_UNITTEST_RE = re.compile(
    r"^(?P<name>\w+) \((?P<where>[\w.]+)\)(?:\n(?!\w+ \([\w.]+\)).*?)? \.\.\. "
    r"(?P<status>ok|FAIL|ERROR|skipped.*|expected failure|unexpected success)$",
    re.MULTILINE,
)
# Failures unittest reports without a result line of their own (import errors, class fixtures).
_UNITTEST_BLOCK_RE = re.compile(r"^(?:ERROR|FAIL): (?P<name>\w+) \((?P<where>[\w.]+)\)", re.MULTILINE)
_PYTEST_RE = re.compile(
    r"^(?P<status>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (?P<id>\S+::\S+)", re.MULTILINE
)


def parse_unittest(output: str) -> dict[str, Outcome]:
    """Outcomes from ``python -m unittest -v`` output, keyed ``module.Class.test``."""
    out: dict[str, Outcome] = {}
    for m in _UNITTEST_RE.finditer(output):
        where, status = m["where"], m["status"]
        # 3.11 prints (module.Class.test); older versions (module.Class): make both the full id
        test_id = where if where.endswith("." + m["name"]) else f"{where}.{m['name']}"
        if status in ("ok", "expected failure"):
            out[test_id] = "pass"
        elif status.startswith("skipped"):
            out[test_id] = "skip"
        else:
            out[test_id] = "fail"
    for m in _UNITTEST_BLOCK_RE.finditer(output):
        where = m["where"]
        test_id = where if where.endswith("." + m["name"]) else f"{where}.{m['name']}"
        out[test_id] = "fail"
    return out


def parse_pytest(output: str) -> dict[str, Outcome]:
    """Outcomes from the short summary of ``pytest -rA`` (``PASSED path::test`` lines)."""
    out: dict[str, Outcome] = {}
    for m in _PYTEST_RE.finditer(output):
        status = m["status"]
        out[m["id"]] = "pass" if status in ("PASSED", "XFAIL") else "skip" if status == "SKIPPED" else "fail"
    return out


class PythonAdapter(LanguageAdapter):
    """Python projects: unittest or pytest suites."""

    name = "python"
    extensions = (".py",)
    manifest_files = ("pyproject.toml", "setup.py", "setup.cfg", "requirements.txt", "tox.ini", "pytest.ini")
    output_hint = (
        "The test command must print per-test results in one of these forms: `python3 -m unittest -v` "
        "(lines `test_x (module.Class.test_x) ... ok`) or `pytest -rA` (lines `PASSED path::test`)."
    )

    def is_test_file(self, path: str) -> bool:
        p = PurePosixPath(path)
        if p.suffix != ".py":
            return False
        return (
            p.name.startswith("test_")
            or p.stem.endswith("_test")
            or p.name == "conftest.py"
            or any(part in ("tests", "test") for part in p.parts[:-1])
        )

    def rerun_env(self, rerun: int) -> dict[str, str]:
        # A fixed, different hash seed per rerun: order-dependent tests flip deterministically.
        return {"PYTHONHASHSEED": str(rerun + 1)}

    def parse_results(self, output: str) -> dict[str, Outcome]:
        return parse_pytest(output) or parse_unittest(output)


# ---- JavaScript -----------------------------------------------------------------------------

_TAP_RE = re.compile(
    r"^(?P<indent> *)(?P<not>not )?ok \d+(?: - (?P<name>.*?))?(?P<directive> # (?:SKIP|TODO)\b.*)?$"
)


def parse_tap(output: str) -> dict[str, Outcome]:
    """Outcomes from TAP (as ``node --test`` prints it): nested subtests are ``parent > child``.

    A parent whose subtests are listed is not a test of its own: only leaves are reported.
    """
    out: dict[str, Outcome] = {}
    # Subtests are printed (indented) before their parent's result line: collect per depth.
    pending: dict[int, list[str]] = {}
    for line in output.splitlines():
        m = _TAP_RE.match(line)
        if not m:
            continue
        depth = len(m["indent"]) // 4
        name = (m["name"] or "").strip() or f"test at depth {depth}"
        children = pending.pop(depth + 1, [])
        if children:
            for child in children:
                out[f"{name} > {child}"] = out.pop(child)
            pending.setdefault(depth, []).extend(f"{name} > {c}" for c in children)
            continue
        if m["directive"]:
            outcome: Outcome = "skip"
        else:
            outcome = "fail" if m["not"] else "pass"
        # a later run of the same name (e.g. two files) keeps the worse outcome
        if out.get(name) != "fail":
            out[name] = outcome
        pending.setdefault(depth, []).append(name)
    return out


class JavaScriptAdapter(LanguageAdapter):
    """Node.js projects: ``node --test`` (TAP) suites."""

    name = "javascript"
    extensions = (".js", ".mjs", ".cjs")
    manifest_files = ("package.json",)
    output_hint = (
        "The test command must print TAP (`node --test` does: lines `ok 1 - name` / `not ok 2 - name`)."
    )

    def is_test_file(self, path: str) -> bool:
        p = PurePosixPath(path)
        if not p.name.endswith(self.extensions):
            return False
        return (
            ".test." in p.name
            or ".spec." in p.name
            or any(part in ("test", "tests", "__tests__") for part in p.parts[:-1])
        )

    def parse_results(self, output: str) -> dict[str, Outcome]:
        return parse_tap(output)


ADAPTERS: dict[str, LanguageAdapter] = {a.name: a for a in (PythonAdapter(), JavaScriptAdapter())}


def adapter_for(language: str) -> LanguageAdapter:
    """The adapter named ``language``; ``ValueError`` naming the supported ones."""
    try:
        return ADAPTERS[language]
    except KeyError:
        raise ValueError(f"unsupported language {language!r}; supported: {', '.join(ADAPTERS)}") from None


def detect_language(paths: Iterable[str]) -> str | None:
    """The best-scoring language for a repository's file list (None when nothing matches)."""
    paths = list(paths)
    scores = {name: a.detect(paths) for name, a in ADAPTERS.items()}
    best = max(scores, key=lambda k: scores[k])
    return best if scores[best] > 0 else None
