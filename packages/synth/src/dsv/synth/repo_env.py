"""Repository environments: resolve a real issue in a real repository; the project's own tests decide.

Tasks of the ``repo_issue`` family are made by ``dsv synth repo-envs``
(``dsv.synth.pipeline.repo_envs``) from a git repository, an issue and the commit that fixed it;
there is no seed-driven generator. The task shows the issue text; its hidden state holds

- ``snapshot``: the parent commit's tree (``git archive``, gzip, base64);
- ``hidden_tests``: the fix's test files (full content; ``None`` deletes), laid over the working copy
  last, so an answer cannot change them;
- ``fail_to_pass`` / ``pass_to_pass``: the test ids that failed before and passed after the fix, and
  those that passed on both sides, each stable across reruns;
- ``recipe``: the install and test shell commands the setup agent found (``language``: the adapter
  of ``dsv.synth.repo_langs`` that reads the results);
- ``solution``: the fix's other changed files (the reference answer).

Tools are ``code_repair``'s, over the whole repository: ``list_files``, ``read_file``, ``search``,
``write_file`` and ``run_tests`` (the visible suite, in the sandbox). The answer is a JSON object of
changed files (``{"path": "complete new content"}``, ``null`` deletes); edits made with
``write_file`` count as well, so ``{}`` submits the working copy. ``verify`` runs the recipe on the
parent tree + the answer + the hidden tests in ``dsv.synth.sandbox`` and passes when every
fail-to-pass and pass-to-pass test passes (reward: the share that do). Edits to test files (the
suite's runner and helpers too) and to the files the recipe's commands name (``protected_paths``)
are not applied: the suite runs as the parent defines it.

Forged results: the answer's code runs in the same process tree as the test runner, so it can print
lines that look like test results. Where the language has a reporter (``LanguageAdapter.reporter``:
Python's unittest), each run gets a fresh random tag that only the host and the reporter know: the
reporter's files are written after the install step (after every process the install left behind is
killed, where the sandbox runs under its own uid) and delete themselves while the test interpreter
starts, before the real user site's ``.pth`` files and any repository code run. The tag never
appears in an argument, environment variable or file the answer's code can read. A task whose reference runs were fully covered by tagged lines has ``trusted_results`` set,
and its verifier then reads only tagged lines: printed look-alikes, or an early exit after printing
them, leave the fail-to-pass tests unreported, which fails. Independently of the reporter, an
answer's edits to test files and to the files the recipe names are not applied (``protected_paths``),
so rewriting the suite's runner to print passes does not work in any language.

What remains: in-process code that deliberately searches the interpreter's memory for the tag or
patches unittest's bookkeeping; a test command whose first Python ignores the user site (``-s``,
``-I``, ``-E``) and runs answer code, which could read the still-present reporter files;
answer-editable files that a protected script runs in turn; and suites without a reporter (pytest,
JavaScript, Java), whose printed look-alike lines are still believed.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import functools
import gzip
import io
import json
import re
import secrets
import shlex
import tarfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, ClassVar

from dsv.synth.env import DEFAULT_DIFFICULTY, Environment, Score, Task, ToolCallRecord
from dsv.synth.repo_langs import Outcome, adapter_for, parse_reported
from dsv.synth.sandbox import Limits, SandboxResult, isolation_report, run_command

__all__ = [
    "REPO_LIMITS",
    "RepoIssueEnv",
    "SuiteRun",
    "decode_snapshot",
    "encode_snapshot",
    "protected_paths",
    "run_suite",
]

# Test suites need more than a snippet: node alone reserves over 1 GB of address space.
REPO_LIMITS = Limits(
    cpu_s=60, wall_s=120, memory_mb=4096, output_bytes=4_000_000, max_processes=128, disk_mb=512,
    file_size_mb=64,
)  # fmt: skip
_SKIP_DIRS = (".git", ".dsv")
_MAX_READ_CHARS = 20_000


def encode_snapshot(tar_bytes: bytes) -> str:
    """A tree as the task stores it: an uncompressed tar (``git archive``), gzipped at mtime 0, base64."""
    return base64.b64encode(gzip.compress(tar_bytes, mtime=0)).decode("ascii")


@functools.lru_cache(maxsize=16)
def decode_snapshot(snapshot: str) -> dict[str, bytes]:
    """Path -> bytes of every regular file in a snapshot (read in memory: nothing is extracted to disk)."""
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(snapshot)), mode="r:gz") as tar:
        for member in tar:
            if member.isfile():
                f = tar.extractfile(member)
                if f is not None:
                    out[member.name.removeprefix("./")] = f.read()
    return out


def safe_repo_path(path: str) -> str | None:
    """``path`` normalised if it is a relative path inside the repository (not .git), else None."""
    if not isinstance(path, str) or not path or "\\" in path or any(ord(ch) < 32 for ch in path):
        return None
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or p.parts[0] in _SKIP_DIRS:
        return None
    return str(p)


@dataclass
class SuiteRun:
    """One sandboxed install + test run: per-test outcomes and how the run went."""

    results: dict[str, Outcome]
    status: str  # the sandbox status ("ok", "timeout", ...)
    install_rc: int | None
    test_rc: int | None
    output: str  # combined output (install, then tests), tail-trimmed
    wall_s: float
    sandbox: SandboxResult | None = field(default=None, repr=False)
    # Outcomes from the language's reporter (tagged lines only); None when the language has none.
    reported: dict[str, Outcome] | None = None

    def outcomes(self, trusted: bool = False) -> dict[str, Outcome]:
        """The outcomes to judge by: the reporter's alone when ``trusted``, else the parsed text."""
        return (self.reported or {}) if trusted else self.results

    @property
    def ran(self) -> bool:
        """The install succeeded and the parser found at least one test result."""
        return self.install_rc == 0 and bool(self.results)

    def problem(self) -> str:
        """Why the run did not produce test results (empty when it did)."""
        if self.ran:
            return ""
        if self.status == "timeout":
            return f"the run was killed at the sandbox's time limit after {self.wall_s:.0f} s"
        if self.status not in ("ok", "error"):
            return f"the sandbox stopped the run ({self.status})"
        if self.install_rc is None:
            return "the snapshot could not be unpacked or the run did not reach the install step"
        if self.install_rc != 0:
            return f"the install command exited with {self.install_rc}"
        if self.test_rc is None:
            return "the test command did not finish"
        return f"the test command (exit {self.test_rc}) printed no test results the parser understands"


_RUNNER = """exec 2>&1
W=$(pwd)
mkdir repo && base64 -d .dsv/repo.b64 | tar -xzf - -C repo || exit 90
if [ -d .dsv/overlay ]; then cp -R .dsv/overlay/. repo/ || exit 90; fi
while IFS= read -r p; do [ -n "$p" ] && rm -rf -- "repo/$p"; done < .dsv/delete.txt
rm -rf .dsv
cd repo
{env}
( {install}
) </dev/null
rc=$?
echo; echo "{mark} install $rc"
[ $rc -eq 0 ] || exit 91
{reporter}
( {test}
) </dev/null
rc=$?
echo; echo "{mark} test $rc"
"""


def _reporter_block(files: Mapping[str, str], env: Mapping[str, str], kill_leftovers: bool) -> str:
    """Shell lines that write the reporter's files into a fresh directory just before the test step.

    The block (and the tag inside the files) lives only in the runner shell's memory until then:
    the script file was deleted before the install step ran.
    """
    if not files:
        return ""
    lines = []
    if kill_leftovers:
        # Everything the install step left running (say, a process waiting for the reporter's files)
        # dies here: kill(-1) reaches every process of the run's own uid except this shell.
        lines.append("kill -9 -1 2>/dev/null")
    # A fresh name the install step could not know; in the private root (workdir /work) it goes on
    # the run's own /tmp tmpfs, where creating and deleting entries costs far less than on a disk.
    lines.append('case "$W" in /work) B=/tmp ;; *) B="$W" ;; esac')
    d = f"$B/.dsv-r{secrets.token_hex(8)}"
    parents = sorted({str(PurePosixPath(name).parent) for name in files} - {"."})
    lines.append(" ".join(["mkdir -p -m 700", f'"{d}"', *(f'"{d}/{p}"' for p in parents), "|| exit 90"]))

    def expand(text: str) -> str:
        """``text`` as one shell word, with each ``{dir}`` standing for the directory."""
        parts = [shlex.quote(part) if part else "" for part in text.split("{dir}")]
        return f'"{d}"'.join(parts) or "''"

    for name, content in files.items():
        # printf is a shell builtin: no process per file (a heredoc needs a cat for each)
        lines.append(f"printf '%s' {expand(content)} > \"{d}/{name}\" || exit 90")
    for key, value in env.items():
        lines.append(f"export {key}={expand(value)}")
    return "\n".join(lines)


def run_suite(
    snapshot: str,
    overlay: Mapping[str, str | None],
    recipe: Mapping[str, str],
    language: str,
    *,
    rerun: int = 0,
    limits: Limits = REPO_LIMITS,
) -> SuiteRun:
    """Unpack ``snapshot`` in the sandbox, lay ``overlay`` over it (None deletes), run the recipe.

    The recipe's ``install`` and ``test`` are shell commands run from the repository root.
    """
    adapter = adapter_for(language)
    mark = f"@@dsv-{secrets.token_hex(6)}"
    run_env = {**adapter.env(), **adapter.rerun_env(rerun)}
    env_lines = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in run_env.items())
    tag = f"@@dsv-result-{secrets.token_hex(16)}"
    reporter_files, reporter_env = adapter.reporter(tag)
    reporter = _reporter_block(
        reporter_files, reporter_env, kill_leftovers=bool(isolation_report()["unprivileged_uid"])
    )
    script = _RUNNER.format(
        env=env_lines,
        install=recipe.get("install") or "true",
        reporter=reporter,
        test=recipe.get("test") or "false",
        mark=mark,
    )
    files: dict[str, str] = {".dsv/repo.b64": snapshot, ".dsv/run.sh": script}
    deletions = []
    for path, content in overlay.items():
        if content is None:
            deletions.append(path)
        else:
            files[f".dsv/overlay/{path}"] = content
    files[".dsv/delete.txt"] = "".join(f"{p}\n" for p in deletions)
    r = run_command(["/bin/sh", ".dsv/run.sh"], files=files, limits=limits, toolchains=adapter.toolchains)
    output = r.stdout + (("\n" + r.stderr) if r.stderr else "")
    install_rc = test_rc = None
    install_out, test_out = output, ""
    m = re.search(rf"^{mark} install (-?\d+)$", output, re.MULTILINE)
    if m:
        install_rc = int(m.group(1))
        install_out, test_out = output[: m.start()], output[m.end() :]
        t = re.search(rf"^{mark} test (-?\d+)$", test_out, re.MULTILINE)
        if t:
            test_rc = int(t.group(1))
            test_out = test_out[: t.start()]
    results = adapter.parse_results(test_out) if install_rc == 0 else {}
    reported = None
    if reporter_files:
        reported = parse_reported(test_out, tag) if install_rc == 0 else {}
        # the tag is this run's secret and means nothing to a reader: its lines are not shown
        test_out = re.sub(rf"\n?^{re.escape(tag)} .*\n?", "", test_out, flags=re.MULTILINE)
    shown = (install_out[-4000:] + "\n" + test_out[-8000:]).strip()
    return SuiteRun(results, r.status, install_rc, test_rc, shown, r.wall_s, r, reported)


def _decode_text(data: bytes) -> str | None:
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _answer_overlay(answer: Any) -> dict[str, str | None] | str:
    """The answer as an overlay, or why it is malformed."""
    if not isinstance(answer, dict):
        return 'expected a JSON object {"path": "complete new content" or null, ...}'
    out: dict[str, str | None] = {}
    for path, content in answer.items():
        safe = safe_repo_path(path)
        if safe is None:
            return f"{path!r} is not a relative path inside the repository"
        if content is not None and not isinstance(content, str):
            return f"content of {path!r} must be a string (or null to delete the file)"
        out[safe] = content
    return out


def _trace_overlay(trace: list[ToolCallRecord] | None) -> dict[str, str | None]:
    """The working-copy edits an episode made through ``write_file`` (successful calls only)."""
    out: dict[str, str | None] = {}
    for call in trace or []:
        if call.name != "write_file" or not call.result.startswith("wrote "):
            continue
        path, content = call.arguments.get("path"), call.arguments.get("content")
        safe = safe_repo_path(path) if isinstance(path, str) else None
        if safe is not None and isinstance(content, str):
            out[safe] = content
    return out


# Commands whose test definitions live in a manifest: the manifest is part of the test command then.
_RUNNER_MANIFESTS = {"make": ("Makefile", "makefile", "GNUmakefile"), "npm": ("package.json",),
                     "yarn": ("package.json",), "tox": ("tox.ini",), "mvn": ("pom.xml",),
                     "gradle": ("build.gradle", "build.gradle.kts"), "ant": ("build.xml",)}  # fmt: skip


def protected_paths(edits: Mapping[str, str | None], language: str, recipe: Mapping[str, str]) -> set[str]:
    """The edited paths an answer may not change: test files and the files the recipe runs or reads.

    Test files (``LanguageAdapter.is_test_file``: the suite's runner and helpers included, new ones
    as well) and files the recipe's commands name (``sh run_tests.sh``, a Makefile for ``make``,
    package.json for ``npm``) stay as in the parent, so an answer cannot make the suite report
    success by rewriting how it runs.
    """
    adapter = adapter_for(language)
    named: set[str] = set()
    for command in (recipe.get("install") or "", recipe.get("test") or ""):
        try:
            words = shlex.split(command, comments=True)
        except ValueError:
            words = command.split()
        for word in words:
            named.add(word.removeprefix("./"))
            named.update(_RUNNER_MANIFESTS.get(PurePosixPath(word).name, ()))
    return {p for p in edits if adapter.is_test_file(p) or p in named}


def _summary(results: Mapping[str, Outcome], limit: int = 20) -> str:
    failing = sorted(k for k, v in results.items() if v == "fail")
    passing = sum(v == "pass" for v in results.values())
    head = f"{passing} passed, {len(failing)} failed, {sum(v == 'skip' for v in results.values())} skipped"
    if failing:
        more = f" (+{len(failing) - limit} more)" if len(failing) > limit else ""
        head += "; failing: " + ", ".join(failing[:limit]) + more
    return head


class RepoIssueEnv(Environment):
    """Tasks from ``dsv synth repo-envs``: resolve an issue so the repository's hidden tests pass."""

    name = "repo_issue"
    domain = "code"
    description = "Resolve a real issue in a real repository; the fix's hidden tests run in the sandbox."
    difficulty_knobs = "set by the pipeline from the size of the reference fix (1: one small file .. 5: many)"
    limits: ClassVar[Limits] = REPO_LIMITS
    # For `dsv synth list`: the family has no generator, so it says which command makes its tasks.
    made_by: ClassVar[str] = "dsv synth repo-envs REPO --issues issues.json --endpoint URL --model M"
    tool_names: ClassVar[tuple[str, ...]] = ("list_files", "read_file", "search", "write_file", "run_tests")

    def generate(self, seed: int, difficulty: int = DEFAULT_DIFFICULTY) -> Task:
        raise ValueError(
            "repo_issue tasks are built from git repositories by `dsv synth repo-envs`; "
            "use its task file (`dsv eval --tasks OUT/tasks.jsonl`)"
        )

    def tools(self, task: Task) -> list[Callable[..., Any]]:
        state = task.state
        # this episode's working copy: text files of the parent tree (binary files are listed only)
        tree = decode_snapshot(state["snapshot"])
        files: dict[str, str | None] = {p: _decode_text(b) for p, b in tree.items()}
        edits: dict[str, str | None] = {}
        env = self

        def current(path: str) -> str | None:
            return edits[path] if path in edits else files.get(path)

        def list_files(prefix: str = "") -> str:
            """List the repository's files (paths relative to its root).

            Args:
                prefix: only paths starting with this (e.g. a directory such as "src/").
            """
            paths = [p for p in sorted({*files, *edits}) if p.startswith(prefix)]
            return json.dumps(paths[:2000])

        def read_file(path: str, start_line: int = 1, end_line: int = 0) -> str:
            """Read a text file of the repository (with the edits made so far).

            Args:
                path: a path as listed by list_files.
                start_line: first line to return (1-based).
                end_line: last line to return (0: to the end; long files are cut at 20000 characters).
            """
            safe = safe_repo_path(path)
            if safe is None or (safe not in files and safe not in edits):
                return f"error: no file {path!r}"
            text = current(safe)
            if text is None:
                return f"error: {path!r} is a binary file"
            lines = text.splitlines(keepends=True)
            chunk = "".join(lines[max(0, start_line - 1) : end_line if end_line > 0 else None])
            return chunk[:_MAX_READ_CHARS]

        def search(pattern: str, glob: str = "*") -> str:
            """Search the repository's text files for a regular expression (like grep -n).

            Args:
                pattern: a Python regular expression.
                glob: only files whose path matches this shell pattern (e.g. "*.py").
            """
            try:
                rx = re.compile(pattern)
            except re.error as exc:
                return f"error: bad regular expression: {exc}"
            hits = []
            for path in sorted({*files, *edits}):
                text = current(path)
                if text is None or not fnmatch.fnmatch(path, glob):
                    continue
                for i, line in enumerate(text.splitlines(), 1):
                    if rx.search(line):
                        hits.append(f"{path}:{i}: {line[:200]}")
                        if len(hits) >= 50:
                            return "\n".join(hits) + "\n(first 50 matches)"
            return "\n".join(hits) or "no matches"

        def write_file(path: str, content: str) -> str:
            """Replace (or create) a file in the working copy; run_tests and the final answer use it.

            Args:
                path: path relative to the repository root.
                content: the complete new content.
            """
            safe = safe_repo_path(path)
            if safe is None:
                return "error: path must be relative and inside the repository"
            edits[safe] = content
            return f"wrote {len(content)} characters to {safe}"

        def run_tests() -> str:
            """Install the project and run its visible test suite on the working copy (sandboxed, no network)."""
            run = run_suite(
                state["snapshot"], dict(edits), state["recipe"], state["language"], limits=env.limits
            )
            if not run.ran:
                return f"the suite did not run: {run.problem()}\n{run.output[-3000:]}"
            results = run.outcomes(bool(state.get("trusted_results")))
            return _summary(results) + "\n" + run.output[-3000:]

        return [list_files, read_file, search, write_file, run_tests]

    def solve(self, task: Task) -> Any:
        return dict(task.state["solution"])

    def verify(self, task: Task, answer: Any, trace: list[ToolCallRecord] | None = None) -> Score:
        overlay = _answer_overlay(answer)
        if isinstance(overlay, str):
            return Score.fail(overlay)
        state = task.state
        # edits from the tools first, the answer over them; then the protected files are the parent's
        # again and the hidden tests are laid over last (none of them can be changed)
        edits = {**_trace_overlay(trace), **overlay}
        protected = protected_paths(edits, state["language"], state["recipe"])
        merged = {**{p: c for p, c in edits.items() if p not in protected}, **state["hidden_tests"]}
        run = run_suite(state["snapshot"], merged, state["recipe"], state["language"], limits=self.limits)
        wanted = list(state["fail_to_pass"]) + list(state["pass_to_pass"])
        dropped = f" (edits to {len(protected)} test or test-runner file(s) were not applied)" if protected else ""
        if not run.ran:
            return Score.fail(f"the test suite did not run: {run.problem()}{dropped}")
        results = run.outcomes(bool(state.get("trusted_results")))
        failing = [t for t in wanted if results.get(t) != "pass"]
        if not failing:
            return Score.ok(f"all {len(wanted)} tests pass ({len(state['fail_to_pass'])} fail-to-pass)")
        reward = (len(wanted) - len(failing)) / len(wanted)
        f2p = [t for t in failing if t in state["fail_to_pass"]]
        p2p = [t for t in failing if t not in state["fail_to_pass"]]
        parts = []
        if f2p:
            parts.append(f"{len(f2p)} fail-to-pass test(s) still fail: {', '.join(f2p[:5])}")
        if p2p:
            parts.append(f"{len(p2p)} test(s) that passed before now fail: {', '.join(p2p[:5])}")
        return Score.fail("; ".join(parts) + dropped, reward=reward)

    def perturb(self, task: Task, answer: Any, rng: Any) -> list[Any]:
        # the untouched parent tree, and the fix with one changed file reverted
        out: list[Any] = [{}]
        if isinstance(answer, dict) and answer:
            tree = decode_snapshot(task.state["snapshot"])
            path = rng.choice(sorted(answer))
            with contextlib.suppress(KeyError):
                original = _decode_text(tree[path])
                if original is not None:
                    out.append({**answer, path: original})
        return out
