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
- ``parse_results(output)``: per-test outcomes (``pass``/``fail``/``skip``) from the suite's output;
- ``toolchains`` and ``env()``: what the sandbox must expose and set for the language's tools to start;
- ``reporter(tag)``: optional files that make the test framework itself report each outcome on a
  line starting with ``tag``, a secret of the run (see "Forged results" below).

Python reads ``unittest -v`` and ``pytest -rA`` output; JavaScript reads the TAP that
``node --test`` prints (nested subtests are named ``parent > child``); Java reads TAP (what a
plain ``main``-based runner prints) and JUnit XML reports printed to the output.

Forged results: the answer's code runs inside the test process, so it can print lines that look
like test results. For Python's unittest the runner installs a reporter that runs while the
interpreter starts, before any repository code: a module loaded through a ``.pth`` file of a fresh
user site-packages (``PYTHONUSERBASE``), written just before the test step and deleted by its own
first statements, hooks ``unittest.TestResult`` and writes ``<tag> pass|fail|skip <test id>``
lines, where the tag is a fresh random value known only to the host and to that module. A task
whose reference run is fully covered by such lines is verified on them alone, so printed look-alike
lines (or an early exit after printing them) count for nothing. What remains is code that
deliberately searches the interpreter for the tag (it lives in the hook's closure) or patches
unittest's own bookkeeping; pytest, JavaScript and Java suites are still read from their text.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
import shutil
import sys
import xml.etree.ElementTree as ET
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import PurePosixPath
from typing import ClassVar, Literal

__all__ = [
    "ADAPTERS",
    "JavaAdapter",
    "JavaScriptAdapter",
    "LanguageAdapter",
    "Outcome",
    "PythonAdapter",
    "adapter_for",
    "detect_language",
    "parse_junit_xml",
    "parse_pytest",
    "parse_reported",
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
    # Names from dsv.synth.sandbox.TOOLCHAINS the sandbox exposes for this language's tools.
    toolchains: ClassVar[tuple[str, ...]] = ()

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

    def env(self) -> dict[str, str]:
        """Environment variables every install and test run of this language gets (default: none)."""
        return {}

    def reporter(self, tag: str) -> tuple[dict[str, str], dict[str, str]]:
        """Files (relative to a fresh directory) and environment that make the test framework print
        ``<tag> <outcome> <test id>`` lines (``{dir}`` in either stands for that directory's absolute
        path); default: no reporter."""
        return {}, {}

    @abstractmethod
    def parse_results(self, output: str) -> dict[str, Outcome]:
        """Test id -> outcome from the test command's combined stdout and stderr."""


def parse_reported(output: str, tag: str) -> dict[str, Outcome]:
    """Outcomes from the reporter's ``<tag> pass|fail|skip <test id>`` lines (a failure sticks)."""
    out: dict[str, Outcome] = {}
    rx = re.compile(rf"^{re.escape(tag)} (?P<outcome>pass|fail|skip) (?P<id>.+)$", re.MULTILINE)
    for m in rx.finditer(output):
        test_id, outcome = m["id"], m["outcome"]
        if out.get(test_id) != "fail":
            out[test_id] = outcome  # type: ignore[assignment]
    return out


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

    def reporter(self, tag: str) -> tuple[dict[str, str], dict[str, str]]:
        # A random module name: a PYTHONPATH directory the answer controls cannot shadow it.
        module = f"_dsv_report_{secrets.token_hex(6)}"
        files = {f"m/{module}.py": _UNITTEST_REPORTER.replace("@TAG@", tag)}
        for version in _sandbox_pythons():  # a .pth line naming a directory puts it on sys.path
            files[f"lib/python{version}/site-packages/{module}.pth"] = f"{{dir}}/m\nimport {module}\n"
        return files, {"PYTHONUSERBASE": "{dir}"}

    def parse_results(self, output: str) -> dict[str, Outcome]:
        return parse_pytest(output) or parse_unittest(output)


# The reporter rides on site's processing of the user site-packages: the test step's
# PYTHONUSERBASE points at a fresh directory whose only .pth file imports this module, under a
# random name, while the interpreter starts. That is before any repository code and before
# PYTHONPATH modules are imported or the real user site's .pth files run (the install step could
# have written those). The module first deletes that whole directory, so neither later processes
# nor the answer's code can read the tag from disk; it imports unittest with sys.path cut to the
# standard library (a PYTHONPATH directory cannot shadow it), and only then adds the real user
# site (~/.local: `pip install --user` packages and their .pth files) and drops PYTHONUSERBASE for
# child processes. Outcomes are collected from unittest's add* calls and written at stopTest,
# after the text runner has finished its own "... ok" line, on a descriptor duplicated now (the
# answer's code may replace sys.stdout). A leading newline keeps the line whole after partial output.
_UNITTEST_REPORTER = """\
import os as _os
import sys as _sys


def _install():
    here = _os.path.abspath(__file__)
    base = _os.path.dirname(_os.path.dirname(here))  # BASE/m/module.py
    for top, dirs, files in _os.walk(base, topdown=False):
        for name in files:
            _os.unlink(_os.path.join(top, name))
        for name in dirs:
            _os.rmdir(_os.path.join(top, name))
    _os.rmdir(base)
    saved = list(_sys.path)
    _sys.path[:] = [p for p in saved if p.startswith((_sys.base_prefix, _sys.base_exec_prefix))]
    try:
        import atexit
        import unittest.result as _result
    finally:
        _sys.path[:] = saved

    tag = "@TAG@"
    fd = _os.dup(2)
    pending = {}
    cls = _result.TestResult

    def emit():
        for test_id, outcome in list(pending.items()):
            _os.write(fd, ("\\n%s %s %s\\n" % (tag, outcome, test_id)).encode("utf-8", "replace"))
        pending.clear()

    def record(outcome):
        def hook(original):
            def wrapper(self, test, *args):
                test_id = test.id() if hasattr(test, "id") else str(test)
                if not (outcome == "sub" and args[-1] is None):
                    state = "fail" if outcome == "sub" else outcome
                    if pending.get(test_id) != "fail":
                        pending[test_id] = state
                return original(self, test, *args)
            return wrapper
        return hook

    for name, outcome in (("addSuccess", "pass"), ("addFailure", "fail"), ("addError", "fail"),
                          ("addSkip", "skip"), ("addExpectedFailure", "pass"),
                          ("addUnexpectedSuccess", "fail"), ("addSubTest", "sub")):
        setattr(cls, name, record(outcome)(getattr(cls, name)))

    def flush_after(original):
        def wrapper(self, *args):
            result = original(self, *args)
            emit()
            return result
        return wrapper

    cls.stopTest = flush_after(cls.stopTest)
    cls.stopTestRun = flush_after(cls.stopTestRun)
    atexit.register(emit)

    _sys.path[:] = [p for p in _sys.path if not p.startswith(base + _os.sep)]
    import site
    _os.environ.pop("PYTHONUSERBASE", None)
    site.USER_BASE = _os.path.join(_os.path.expanduser("~"), ".local")
    site.USER_SITE = _os.path.join(site.USER_BASE, "lib", "python%d.%d" % _sys.version_info[:2], "site-packages")
    if _os.path.isdir(site.USER_SITE):
        site.addsitedir(site.USER_SITE)


_install()
del _install
"""


@functools.cache
def _sandbox_pythons() -> tuple[str, ...]:
    """The X.Y of every Python the sandbox can start (it sees the host's /usr and the sandbox's own
    interpreter): the reporter is laid into each one's user site, whichever the recipe runs. Each
    costs a few directory entries, which a busy disk makes slow to create and delete."""
    from dsv.synth.sandbox import sandbox_python

    own = f"{sys.version_info.major}.{sys.version_info.minor}"
    versions = {own} if sandbox_python() == sys.executable else set()
    for d in ("/usr/bin", "/usr/local/bin"):
        with contextlib.suppress(OSError):
            versions.update(m[1] for n in os.listdir(d) if (m := re.fullmatch(r"python(3\.\d+)", n)))
    return tuple(sorted(versions)) or (own,)


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


# ---- Java -----------------------------------------------------------------------------------

_TESTSUITE_RE = re.compile(r"<testsuite\b.*?</testsuite>|<testsuite\b[^>]*/>", re.DOTALL)


def parse_junit_xml(output: str) -> dict[str, Outcome]:
    """Outcomes from JUnit XML reports (Surefire, Gradle, the JUnit console launcher) in the output.

    Each ``<testcase classname="C" name="m">`` is ``C.m`` (a trailing ``()`` dropped); a
    ``failure`` or ``error`` child fails it, ``skipped`` skips it. Several reports may be printed
    one after another (``cat reports/*.xml``), with other text around them.
    """
    out: dict[str, Outcome] = {}
    for m in _TESTSUITE_RE.finditer(output):
        try:
            suite = ET.fromstring(m.group(0))
        except ET.ParseError:
            continue
        for case in suite.iter("testcase"):
            name = (case.get("name") or "").removesuffix("()")
            cls = case.get("classname") or ""
            test_id = f"{cls}.{name}" if cls else name
            tags = {child.tag for child in case}
            outcome: Outcome = (
                "fail" if tags & {"failure", "error"} else "skip" if "skipped" in tags else "pass"
            )
            if out.get(test_id) != "fail":
                out[test_id] = outcome
    return out


@functools.cache
def _jdk_home() -> str | None:
    """The JDK that ``javac`` on the host's PATH belongs to (the sandbox sees the same /usr)."""
    javac = shutil.which("javac", path="/usr/local/bin:/usr/bin:/bin")
    if javac is None:
        return None
    home = os.path.dirname(os.path.dirname(os.path.realpath(javac)))
    return home if os.path.isfile(os.path.join(home, "lib", "libjli.so")) else None


class JavaAdapter(LanguageAdapter):
    """Java projects compiled with the JDK's ``javac``: TAP from a ``main``-based runner, or JUnit XML."""

    name = "java"
    extensions = (".java",)
    manifest_files = ("pom.xml", "build.gradle", "build.gradle.kts", "settings.gradle", "build.xml")
    output_hint = (
        "The test command must print per-test results either as TAP (lines `ok 1 - Class.method` / "
        "`not ok 2 - Class.method`, which a plain `main`-based test runner can print) or as JUnit XML "
        "reports (e.g. `cat target/surefire-reports/*.xml`). `javac` and `java` are on PATH; there is no "
        "network, so Maven or Gradle can only work with every dependency already in the repository."
    )
    toolchains = ("java",)

    def is_test_file(self, path: str) -> bool:
        p = PurePosixPath(path)
        if p.suffix != ".java":
            return False
        return (
            p.stem.endswith(("Test", "Tests"))
            or p.stem.startswith("Test")
            or any(part in ("test", "tests") for part in p.parts[:-1])
        )

    def env(self) -> dict[str, str]:
        # The JDK's launchers find libjli.so through an $ORIGIN run path, which glibc resolves via
        # /proc/self/exe; the sandbox's private root has no /proc, so the directory is named here.
        home = _jdk_home()
        if home is None:
            return {}
        return {"JAVA_HOME": home, "LD_LIBRARY_PATH": os.path.join(home, "lib")}

    def parse_results(self, output: str) -> dict[str, Outcome]:
        return parse_junit_xml(output) or parse_tap(output)


ADAPTERS: dict[str, LanguageAdapter] = {
    a.name: a for a in (PythonAdapter(), JavaScriptAdapter(), JavaAdapter())
}


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
