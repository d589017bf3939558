"""``dsv synth repo-envs``: executable environments from git repositories, issues and the commits that fixed them.

Candidates come from local git repositories and issue / pull-request records in the GitHub
API's shape (``GET /repos/{owner}/{repo}/issues`` and ``/pulls`` objects):

- a pull request whose body says ``Fixes #N`` (or closes/resolves) pairs issue ``N`` with its
  ``merge_commit_sha`` (the squashed fix; its first parent is the tree the task starts from);
- a commit on the repository's current branch whose message references ``#N`` the same way.

A record belongs to the repository whose folder name equals the last part of its
``repository_url`` (issues) or ``base.repo.name`` (pulls); with one repository every record does.

For each candidate the pipeline

1. splits the fix's changed files into tests (the language adapter's ``is_test_file``) and the
   rest; a fix that changes no test file is rejected (``no_tests``);
2. finds the repository's install and test commands with a setup agent: any OpenAI-compatible
   endpoint proposes a recipe, the recipe runs in the sandbox on the fixed tree, and the failure
   (exit codes, what the sandbox stopped, the output's tail) goes back to the agent until the suite
   runs or the attempts are spent (``setup_failed``). The recipe is kept per repository and reused;
   network access, writes outside the workdir and runs past the time limit are stopped by the
   sandbox and noted in the report;
3. runs the suite ``reruns`` times on the parent tree with the fix's tests, and as many times on the
   fixed tree (each rerun with the adapter's rerun environment): fail-to-pass tests fail on every
   run before and pass on every run after, pass-to-pass tests pass on all of them, and a test whose
   outcome changes between reruns of one tree is flaky and belongs to neither set. An environment
   needs both sets non-empty (``no_fail_to_pass``, ``flaky``, ``no_pass_to_pass``);
4. builds the ``repo_issue`` task (``dsv.synth.repo_env``) and checks it through the environment
   itself: the reference fix passes ``verify``, the untouched parent fails it;
5. rejects duplicates: the same fix already accepted here or present in ``existing`` task files.

``OUT/state.json`` is written after every candidate (atomically), so a re-run skips finished
candidates and retries only those that failed to reach the endpoint. Accepted tasks are kept in
``OUT/envs/`` and gathered into ``OUT/tasks.jsonl``; ``OUT/report.json`` and ``OUT/report.md`` count
accept/reject reasons and list every setup attempt.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dsv.synth.env import Task
from dsv.synth.eval._io import atomic_write_json, atomic_write_text
from dsv.synth.eval.client import EndpointClient, EndpointError
from dsv.synth.repo_env import (
    REPO_LIMITS,
    RepoIssueEnv,
    SuiteRun,
    decode_snapshot,
    encode_snapshot,
    run_suite,
)
from dsv.synth.repo_langs import adapter_for, detect_language
from dsv.synth.sandbox import Limits
from dsv.synth.tools import tool_schema

__all__ = [
    "SETUP_INSTRUCTIONS",
    "Candidate",
    "CandidateOutcome",
    "RepoEnvsConfig",
    "RepoEnvsError",
    "build_repo_envs",
    "discover_candidates",
    "find_repositories",
]

STATE_VERSION = 1
_REF_RE = re.compile(r"\b(?:fix(?:e[sd])?|close[sd]?|resolve[sd]?)\s*:?\s+#(\d+)\b", re.IGNORECASE)
_NETWORK_HINTS = (
    "Network is unreachable",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Could not resolve host",
    "Connection refused",
    "getaddrinfo",
    "ENETUNREACH",
    "EAI_AGAIN",
)
_WRITE_HINTS = ("Read-only file system", "Permission denied", "EROFS", "EACCES")

SETUP_INSTRUCTIONS = """\
You set up a software project so that its test suite runs in a sandbox.
The sandbox is a fresh Linux directory holding the repository; it has no network access, so nothing
can be downloaded; the current directory is the repository root, and only it (and /tmp) is writable.
Reply with one fenced ```json block holding an object with two shell commands:
{"install": "commands that prepare the project (use \\"true\\" when nothing is needed)",
 "test": "the command that runs the whole test suite"}
The commands run with /bin/sh; the test command's output is parsed per test, so it must be verbose.
"""


class RepoEnvsError(ValueError):
    """Bad input to the pipeline (not a git repository, an unreadable issues file); the message says which."""


@dataclass
class RepoEnvsConfig:
    """Settings of one ``dsv synth repo-envs`` run."""

    out_dir: Path
    issues: Path | None = None
    pulls: Path | None = None
    existing: tuple[Path, ...] = ()
    reruns: int = 3
    setup_attempts: int = 3
    max_snapshot_mb: float = 20.0
    limits: Limits = REPO_LIMITS
    language: str | None = None  # None: detected per repository
    thinking: bool | None = None
    temperature: float | None = None
    max_tokens: int | None = None


@dataclass(frozen=True)
class Candidate:
    """An (issue, fix commit) pair in one repository."""

    id: str
    repo: str  # path of the git repository
    repo_name: str
    issue: int
    title: str
    body: str
    fix: str
    parent: str
    source: str  # "pull" | "commit"


@dataclass
class CandidateOutcome:
    """What happened to one candidate: ``accepted``, ``rejected`` (with a category) or ``error`` (retried)."""

    id: str
    status: str
    category: str
    reason: str
    repo: str = ""
    issue: int = 0
    fix: str = ""
    fail_to_pass: list[str] = field(default_factory=list)
    pass_to_pass: list[str] = field(default_factory=list)
    flaky: list[str] = field(default_factory=list)
    sandbox_runs: int = 0
    wall_s: float = 0.0

    @property
    def finished(self) -> bool:
        return self.status in ("accepted", "rejected")


# ---- git ------------------------------------------------------------------------------------


def _git(repo: str | Path, *args: str) -> bytes:
    try:
        proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, timeout=120, check=False)
    except FileNotFoundError:
        raise RepoEnvsError("git is not installed; install git to build repository environments") from None
    if proc.returncode != 0:
        msg = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RepoEnvsError(f"git {' '.join(args[:2])} failed in {repo}: {msg[-1] if msg else 'no output'}")
    return proc.stdout


def find_repositories(path: Path) -> list[Path]:
    """``path`` if it is a git repository, else the git repositories directly inside it."""
    if not path.is_dir():
        raise RepoEnvsError(f"{path} is not a directory (pass a git repository or a folder of them)")
    if (path / ".git").exists():
        return [path]
    repos = sorted(p for p in path.iterdir() if p.is_dir() and (p / ".git").exists())
    if not repos:
        raise RepoEnvsError(f"{path} is neither a git repository nor a folder holding any (no .git found)")
    return repos


def _load_records(path: Path | None, what: str) -> list[dict[str, Any]]:
    if path is None:
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RepoEnvsError(f"{what} file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RepoEnvsError(f"cannot read {what} file {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise RepoEnvsError(f"{what} file {path} is not JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise RepoEnvsError(f"{what} file {path} must be a JSON list of GitHub {what} objects")
    for i, r in enumerate(data):
        if not isinstance(r.get("number"), int):
            raise RepoEnvsError(f"{what} file {path}: record {i} has no integer 'number'")
    return data


def _record_repo(record: dict[str, Any]) -> str | None:
    url = record.get("repository_url")
    if isinstance(url, str) and url:
        return url.rstrip("/").rsplit("/", 1)[-1]
    base = record.get("base")
    if isinstance(base, dict) and isinstance(base.get("repo"), dict):
        name = base["repo"].get("name")
        return str(name) if name else None
    return None


def discover_candidates(
    repos: Sequence[Path], issues_file: Path | None, pulls_file: Path | None
) -> tuple[list[Candidate], list[CandidateOutcome]]:
    """Candidates from pull requests and issue-referencing commits, and the records that cannot be one."""
    issues = _load_records(issues_file, "issues")
    pulls = _load_records(pulls_file, "pulls")
    if not issues:
        raise RepoEnvsError("no issues given: pass --issues FILE (a JSON list of GitHub issue objects)")
    by_repo: dict[str, Path] = {r.name: r for r in repos}

    def owner(record: dict[str, Any]) -> Path | None:
        name = _record_repo(record)
        if name is None:
            return repos[0] if len(repos) == 1 else None
        return by_repo.get(name)

    issue_map: dict[tuple[str, int], dict[str, Any]] = {}
    for rec in issues:
        if "pull_request" in rec:  # the issues API lists pull requests too
            continue
        repo = owner(rec)
        if repo is not None:
            issue_map[(repo.name, rec["number"])] = rec
    found: dict[tuple[str, str], Candidate] = {}
    problems: list[CandidateOutcome] = []

    def add(repo: Path, number: int, fix: str, source: str) -> None:
        issue = issue_map.get((repo.name, number))
        cid = f"{repo.name}-{number}-{fix[:10]}"
        if issue is None:
            problems.append(
                CandidateOutcome(
                    cid,
                    "rejected",
                    "issue_missing",
                    f"#{number} is not in the issues file",
                    repo=repo.name,
                    issue=number,
                    fix=fix,
                )
            )
            return
        parents = _git(repo, "rev-list", "--parents", "-n", "1", fix).decode().split()
        if len(parents) < 2:
            problems.append(
                CandidateOutcome(
                    cid,
                    "rejected",
                    "no_parent",
                    f"fix {fix[:10]} is a root commit",
                    repo=repo.name,
                    issue=number,
                    fix=fix,
                )
            )
            return
        found.setdefault(
            (repo.name, fix),
            Candidate(
                cid,
                str(repo),
                repo.name,
                number,
                str(issue.get("title") or ""),
                str(issue.get("body") or ""),
                fix,
                parents[1],
                source,
            ),
        )

    for pr in pulls:
        repo = owner(pr)
        sha = pr.get("merge_commit_sha")
        refs = [int(n) for n in _REF_RE.findall(f"{pr.get('title') or ''}\n{pr.get('body') or ''}")]
        if repo is None or not isinstance(sha, str) or not refs:
            continue
        try:
            fix = _git(repo, "rev-parse", "--verify", f"{sha}^{{commit}}").decode().strip()
        except RepoEnvsError:
            problems.append(
                CandidateOutcome(
                    f"{repo.name}-pr{pr['number']}",
                    "rejected",
                    "git_error",
                    f"pull #{pr['number']}: commit {sha[:10]} is not in {repo.name}",
                    repo=repo.name,
                )
            )
            continue
        add(repo, refs[0], fix, "pull")
    for repo in repos:
        log = _git(repo, "log", "--format=%H%x00%B%x1e").decode("utf-8", "replace")
        for entry in log.split("\x1e"):
            if "\x00" not in entry:
                continue
            sha, message = entry.strip("\n").split("\x00", 1)
            refs = [int(n) for n in _REF_RE.findall(message)]
            if refs and (repo.name, sha) not in found:
                add(repo, refs[0], sha, "commit")
    ordered = sorted(found.values(), key=lambda c: (c.repo_name, c.issue, c.fix))
    return ordered, problems


def _changes(repo: str, parent: str, fix: str) -> list[tuple[str, str]]:
    """(status letter, path) of the files the fix changed (renames as delete + add)."""
    raw = _git(repo, "diff", "--name-status", "--no-renames", "-z", parent, fix).decode("utf-8", "replace")
    parts = [p for p in raw.split("\0") if p]
    return [(parts[i][0], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]


# ---- setup agent ----------------------------------------------------------------------------

_JSON_FENCE_RE = re.compile(r"```(?:json)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def parse_recipe(reply: str) -> dict[str, str]:
    """The ``{"install", "test"}`` recipe in a setup agent's reply; ``ValueError`` saying what is wrong."""
    blocks = _JSON_FENCE_RE.findall(reply or "")
    text = blocks[-1] if blocks else (reply or "").strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError("the reply holds no JSON object (send one ```json block)") from None
    if not isinstance(data, dict) or not isinstance(data.get("test"), str) or not data["test"].strip():
        raise ValueError('the recipe needs a non-empty "test" command')
    install = data.get("install", "true")
    if not isinstance(install, str):
        raise ValueError('"install" must be a string of shell commands')
    return {"install": install.strip() or "true", "test": data["test"].strip()}


def containment_notes(run: SuiteRun) -> list[str]:
    """What the sandbox stopped in a run (reported per setup attempt)."""
    notes = []
    if run.status == "timeout":
        notes.append("ran past the time limit: killed by the sandbox")
    elif run.status not in ("ok", "error"):
        notes.append(f"stopped by the sandbox ({run.status})")
    if any(h in run.output for h in _NETWORK_HINTS):
        notes.append("network access attempted: blocked (no network in the sandbox)")
    if any(h in run.output for h in _WRITE_HINTS):
        notes.append("write outside the workdir attempted: refused (read-only filesystem view)")
    return notes


def _repo_brief(tree: dict[str, bytes], language: str, name: str) -> str:
    adapter = adapter_for(language)
    paths = sorted(tree)
    lines = [f"Repository {name} (language: {language}), {len(paths)} files:"]
    lines += [f"- {p}" for p in paths[:200]]
    if len(paths) > 200:
        lines.append(f"- ... and {len(paths) - 200} more")
    for p in paths:
        base = p.rsplit("/", 1)[-1]
        if (base in adapter.manifest_files or base.lower().startswith("readme")) and p.count("/") == 0:
            text = tree[p][:2000].decode("utf-8", "replace")
            lines += ["", f"--- {p} ---", text]
    lines += ["", adapter.output_hint]
    return "\n".join(lines)


class _Setup:
    """The setup agent's conversation for one repository, and its attempts."""

    def __init__(self, client: EndpointClient, config: RepoEnvsConfig, saved: dict[str, Any] | None) -> None:
        self.client = client
        self.config = config
        self.saved = saved or {"recipe": None, "attempts": []}

    def recipe(
        self, name: str, language: str, snapshot: str, overlay: dict[str, str | None], tree: dict[str, bytes]
    ) -> tuple[dict[str, str] | None, int, str]:
        """A recipe whose suite runs on (snapshot + overlay), the sandbox runs used, and why none was found.

        Raises ``EndpointError`` when the endpoint cannot be reached.
        """
        runs = 0
        kept = self.saved.get("recipe")
        if kept:
            run = run_suite(snapshot, overlay, kept, language, limits=self.config.limits)
            runs += 1
            if run.ran:
                return kept, runs, ""
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": SETUP_INSTRUCTIONS},
            {"role": "user", "content": _repo_brief(tree, language, name)},
        ]
        problem = "no attempt made"
        for _ in range(self.config.setup_attempts):
            answer = self.client.chat(
                messages,
                thinking=self.config.thinking,
                temperature=self.config.temperature,
                max_tokens=self.config.max_tokens,
            )
            reply = str(answer.message.get("content") or "")
            messages.append({"role": "assistant", "content": reply})
            attempt: dict[str, Any] = {"reply": reply[:2000]}
            try:
                recipe = parse_recipe(reply)
            except ValueError as exc:
                problem = str(exc)
                attempt.update(status="unreadable", problem=problem, contained=[])
                self.saved["attempts"].append(attempt)
                messages.append({"role": "user", "content": f"I could not use that: {problem}. Try again."})
                continue
            run = run_suite(snapshot, overlay, recipe, language, limits=self.config.limits)
            runs += 1
            notes = containment_notes(run)
            attempt.update(
                recipe=recipe,
                status=run.status,
                install_rc=run.install_rc,
                test_rc=run.test_rc,
                tests_found=len(run.results),
                problem=run.problem(),
                contained=notes,
                wall_s=round(run.wall_s, 2),
            )
            self.saved["attempts"].append(attempt)
            if run.ran:
                self.saved["recipe"] = recipe
                return recipe, runs, ""
            problem = run.problem() + (f" ({'; '.join(notes)})" if notes else "")
            messages.append(
                {
                    "role": "user",
                    "content": f"That did not work: {problem}.\nOutput (tail):\n{run.output[-3000:]}\n"
                    "Reply with a corrected recipe.",
                }
            )
        return None, runs, problem


# ---- one candidate --------------------------------------------------------------------------


def _stable_seed(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def _difficulty(solution: dict[str, str | None], tree: dict[str, bytes]) -> int:
    changed = 0
    for path, new in solution.items():
        old = tree.get(path, b"").decode("utf-8", "replace").splitlines()
        changed += abs(len((new or "").splitlines()) - len(old)) + sum(
            a != b for a, b in zip(old, (new or "").splitlines(), strict=False)
        )
    files = len(solution)
    return max(1, min(5, 1 + (changed > 5) + (changed > 20) + (files > 1) + (files > 3)))


def _task_prompt(c: Candidate) -> str:
    return (
        f"You are working in the repository {c.repo_name}. This issue was reported (#{c.issue}):\n\n"
        f"## {c.title}\n\n{c.body.strip()}\n\n"
        "Change the code so the issue is resolved. The project's tests, and hidden tests written for this "
        "issue, decide. Use the tools to list, read and search files, edit them, and run the test suite."
    )


_ANSWER_FORMAT = (
    'Finish with `Answer: {"<path>": "<complete new content>", ...}` (JSON on one line, only files you '
    "changed; null deletes a file). Edits made with write_file count too, so `Answer: {}` submits them."
)


def classify(
    before: list[dict[str, str]], after: list[dict[str, str]]
) -> tuple[list[str], list[str], list[str]]:
    """(fail-to-pass, pass-to-pass, flaky) test ids from reruns before and after the fix (see the module doc)."""
    ids = sorted({t for r in before + after for t in r})
    f2p, p2p, flaky = [], [], []
    for t in ids:
        # a test that did not run (its module failed to import) counts as failing
        b = [r.get(t, "fail") for r in before]
        a = [r.get(t, "fail") for r in after]
        if len(set(b)) > 1 or len(set(a)) > 1:
            flaky.append(t)
        elif all(x == "pass" for x in a):
            if all(x == "pass" for x in b):
                p2p.append(t)
            elif all(x == "fail" for x in b):
                f2p.append(t)
    return f2p, p2p, flaky


def _existing_fixes(paths: Sequence[Path]) -> set[str]:
    from dsv.synth.tasks import read_tasks

    out: set[str] = set()
    for p in paths:
        if not Path(p).exists():
            continue
        for task in read_tasks(p, on_bad_record="skip"):
            if task.family == RepoIssueEnv.name and isinstance(task.state.get("fix"), str):
                out.add(task.state["fix"])
    return out


def process_candidate(
    c: Candidate,
    client: EndpointClient,
    config: RepoEnvsConfig,
    setups: dict[str, dict[str, Any]],
    taken_fixes: set[str],
) -> tuple[CandidateOutcome, Task | None]:
    """Judge one candidate (see the module doc); returns the outcome and, when accepted, its task."""
    start = time.perf_counter()
    runs = 0

    def out(status: str, category: str, reason: str, **kw: Any) -> CandidateOutcome:
        return CandidateOutcome(
            c.id,
            status,
            category,
            reason,
            repo=c.repo_name,
            issue=c.issue,
            fix=c.fix,
            sandbox_runs=runs,
            wall_s=round(time.perf_counter() - start, 3),
            **kw,
        )

    if c.fix in taken_fixes:
        return out("rejected", "duplicate", f"fix {c.fix[:10]} is already an environment"), None
    tar = _git(c.repo, "archive", "--format=tar", c.parent)
    if len(tar) > config.max_snapshot_mb * 1e6:
        return out("rejected", "too_large", f"the parent tree is {len(tar) / 1e6:.1f} MB "
                   f"(limit {config.max_snapshot_mb:g} MB, --max-snapshot-mb)"), None  # fmt: skip
    snapshot = encode_snapshot(tar)
    tree = decode_snapshot(snapshot)
    language = config.language or detect_language(tree)
    if language is None:
        return out("rejected", "unsupported_language", "no supported language detected"), None
    adapter = adapter_for(language)
    tests: dict[str, str | None] = {}
    solution: dict[str, str | None] = {}
    for status, path in _changes(c.repo, c.parent, c.fix):
        content: str | None = None
        if status != "D":
            data = _git(c.repo, "show", f"{c.fix}:{path}")
            try:
                content = data.decode("utf-8")
            except UnicodeDecodeError:
                return out("rejected", "binary_change", f"the fix changes the binary file {path}"), None
        (tests if adapter.is_test_file(path) else solution)[path] = content
    if not tests:
        return out("rejected", "no_tests", "the fix changes no test file, so nothing shows it works"), None
    if not solution:
        return out("rejected", "no_code_change", "the fix changes only tests"), None
    setup = _Setup(client, config, setups.get(c.repo_name))
    setups[c.repo_name] = setup.saved
    recipe, used, problem = setup.recipe(c.repo_name, language, snapshot, {**tests, **solution}, tree)
    runs += used
    if recipe is None:
        return out("rejected", "setup_failed", f"no working recipe after {config.setup_attempts} "
                   f"attempt(s): {problem}"), None  # fmt: skip
    before: list[dict[str, str]] = []
    after: list[dict[str, str]] = []
    reported: list[dict[str, str] | None] = []
    for i in range(config.reruns):
        for side, overlay in ((before, tests), (after, {**tests, **solution})):
            run = run_suite(snapshot, overlay, recipe, language, rerun=i, limits=config.limits)
            runs += 1
            if side is after and not run.ran:
                return out(
                    "rejected", "unstable_suite", f"rerun {i} of the fixed tree: {run.problem()}"
                ), None
            side.append(dict(run.results))
            if side is after:
                reported.append(run.reported)
    f2p, p2p, flaky = classify(before, after)
    sets = {"fail_to_pass": f2p, "pass_to_pass": p2p, "flaky": flaky}
    if not f2p:
        if flaky:
            return out("rejected", "flaky", f"no stable fail-to-pass test; outcome changed across "
                       f"{config.reruns} reruns: {', '.join(flaky[:5])}", **sets), None  # fmt: skip
        return out(
            "rejected", "no_fail_to_pass", "no test fails before the fix and passes after it", **sets
        ), None
    if not p2p:
        return out(
            "rejected", "no_pass_to_pass", "no test passes both before and after the fix", **sets
        ), None
    state = {
        "repo": c.repo_name,
        "issue": c.issue,
        "fix": c.fix,
        "parent": c.parent,
        "language": language,
        "recipe": recipe,
        "snapshot": snapshot,
        "hidden_tests": tests,
        "solution": solution,
        "fail_to_pass": f2p,
        "pass_to_pass": p2p,
        # The language's reporter saw every kept test pass in every run of the fix: the verifier
        # then trusts its tagged lines alone, not text the answer's code could print.
        "trusted_results": all(
            r is not None and all(r.get(t) == "pass" for t in (*f2p, *p2p)) for r in reported
        ),
    }
    seed = _stable_seed(c.id)
    task = Task(
        id=f"repo_issue-{c.id}",
        family=RepoIssueEnv.name,
        seed=seed,
        difficulty=_difficulty(solution, tree),
        prompt=_task_prompt(c),
        tools=[],
        state=state,
        answer_format=_ANSWER_FORMAT,
    )
    env = RepoIssueEnv()
    env.limits = config.limits
    task = Task(**{**task.__dict__, "tools": [tool_schema(fn) for fn in env.tools(task)]})
    good = env.verify(task, env.solve(task))
    bad = env.verify(task, {})
    runs += 2
    if not good.passed:
        return out(
            "rejected", "reference_fails", f"the reference fix fails the verifier: {good.reason}", **sets
        ), None
    if bad.passed:
        return out("rejected", "parent_passes", "the untouched parent passes the verifier", **sets), None
    return out("accepted", "accepted", f"{len(f2p)} fail-to-pass, {len(p2p)} pass-to-pass", **sets), task


# ---- the run --------------------------------------------------------------------------------


def _load_state(path: Path) -> dict[str, Any]:
    if path.exists():
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(state, dict) and state.get("version") == STATE_VERSION:
                state.setdefault("candidates", {})
                state.setdefault("setups", {})
                return state
        except json.JSONDecodeError:
            pass  # written atomically: an unreadable state was not written by this pipeline
    return {"version": STATE_VERSION, "candidates": {}, "setups": {}}


def build_repo_envs(
    client: EndpointClient,
    config: RepoEnvsConfig,
    repos: Sequence[Path],
    *,
    on_start: Callable[[int, int], None] | None = None,
    on_candidate: Callable[[CandidateOutcome], None] | None = None,
    on_begin: Callable[[Candidate], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the pipeline over ``repos``; write the task file and the report, return the report.

    An interrupt (Ctrl-C) writes the report of what finished, then propagates; a re-run resumes.
    """
    from dsv.synth.tasks import write_tasks

    out_dir = Path(config.out_dir)
    (out_dir / "envs").mkdir(parents=True, exist_ok=True)
    candidates, problems = discover_candidates(repos, config.issues, config.pulls)
    state_path = out_dir / "state.json"
    state = _load_state(state_path)
    for p in problems:
        state["candidates"][p.id] = asdict(p)
    order = [p.id for p in problems] + [c.id for c in candidates]
    done = {k for k, v in state["candidates"].items() if v.get("status") in ("accepted", "rejected")}
    if on_start is not None:
        on_start(len(order), len(done & set(order)))
    taken = _existing_fixes(config.existing) | {
        v["fix"] for v in state["candidates"].values() if v.get("status") == "accepted"
    }
    started = time.perf_counter()
    try:
        for c in candidates:
            if c.id in done:
                continue
            if on_begin is not None:
                on_begin(c)
            try:
                outcome, task = process_candidate(c, client, config, state["setups"], taken)
            except EndpointError as exc:
                outcome, task = CandidateOutcome(c.id, "error", "endpoint_error", str(exc)[:500],
                                                 repo=c.repo_name, issue=c.issue, fix=c.fix), None  # fmt: skip
            except RepoEnvsError as exc:
                outcome, task = CandidateOutcome(c.id, "rejected", "git_error", str(exc)[:500],
                                                 repo=c.repo_name, issue=c.issue, fix=c.fix), None  # fmt: skip
            if task is not None:
                atomic_write_json(out_dir / "envs" / f"{c.id}.json", task.to_json())
                taken.add(c.fix)
            state["candidates"][c.id] = asdict(outcome)
            state["elapsed_s"] = round(state.get("elapsed_s", 0.0) + outcome.wall_s, 3)
            atomic_write_json(state_path, state)
            if on_candidate is not None:
                on_candidate(outcome)
    finally:  # also on Ctrl-C: the task file and report of what finished are written
        accepted = [
            Task.from_json(json.loads((out_dir / "envs" / f"{cid}.json").read_text(encoding="utf-8")))
            for cid in order
            if state["candidates"].get(cid, {}).get("status") == "accepted"
            and (out_dir / "envs" / f"{cid}.json").exists()
        ]
        write_tasks(out_dir / "tasks.jsonl", accepted)
        report = _write_report(client, config, state, order, out_dir, time.perf_counter() - started)
    return report


def _write_report(
    client: EndpointClient,
    config: RepoEnvsConfig,
    state: dict[str, Any],
    order: list[str],
    out_dir: Path,
    wall_s: float,
) -> dict[str, Any]:
    rows = [state["candidates"][cid] for cid in order if cid in state["candidates"]]
    statuses = Counter(r["status"] for r in rows)
    judged = statuses.get("accepted", 0) + statuses.get("rejected", 0)
    elapsed = float(state.get("elapsed_s", 0.0))
    report = {
        "endpoint": client.base_url,
        "model": client.model,
        "tasks": str(out_dir / "tasks.jsonl"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "counts": {
            "total": len(order),
            "accepted": statuses.get("accepted", 0),
            "rejected": statuses.get("rejected", 0),
            "error": statuses.get("error", 0),
            "pending": len(order) - len(rows),
        },
        "acceptance_rate": round(statuses.get("accepted", 0) / judged, 3) if judged else None,
        "envs_per_minute": round(60 * statuses.get("accepted", 0) / elapsed, 3) if elapsed else None,
        "candidate_seconds": round(elapsed, 2),
        "this_run_seconds": round(wall_s, 2),
        "by_category": dict(Counter(r["category"] for r in rows).most_common()),
        "candidates": rows,
        "setups": state["setups"],
    }
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", _render_markdown(report))
    return report


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _render_markdown(report: dict[str, Any]) -> str:
    c = report["counts"]
    lines = ["# dsv synth repo-envs report", ""]
    for key in ("endpoint", "model", "tasks", "finished", "acceptance_rate", "envs_per_minute"):
        lines.append(f"- {key}: `{report[key]}`")
    lines += [
        "",
        f"{c['accepted']} accepted, {c['rejected']} rejected, {c['error']} endpoint errors (of {c['total']}).",
        "",
        "| reason | count |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in report["by_category"].items()),
        "",
        "| candidate | status | category | reason | F2P | P2P | flaky |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["candidates"]:
        lines.append(
            f"| {_cell(r['id'])} | {r['status']} | {r['category']} | {_cell(r['reason'])} | "
            f"{len(r['fail_to_pass'])} | {len(r['pass_to_pass'])} | {len(r['flaky'])} |"
        )
    lines += ["", "## Setup agent", ""]
    for repo, setup in report["setups"].items():
        lines.append(f"### {repo}: recipe {json.dumps(setup.get('recipe'))}")
        for i, a in enumerate(setup.get("attempts", []), 1):
            contained = "; ".join(a.get("contained") or []) or "-"
            lines.append(
                f"- attempt {i}: {json.dumps(a.get('recipe'))} -> {a.get('status')}, "
                f"{a.get('problem') or 'suite ran'}; contained: {contained}"
            )
        lines.append("")
    return "\n".join(lines) + "\n"
