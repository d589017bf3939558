"""`dsv synth repo-envs` end to end: real git repositories, a scripted setup agent on loopback, the real sandbox.

The test builds small repositories in three languages: a Python project whose fix comes
with a test (kept), one whose fix adds only a test that depends on set order (flaky:
rejected), a fix without a test (rejected), and a JavaScript project whose pull request
fixes an issue (kept); a Java project compiled with javac and run by a plain main-based runner
that prints TAP gets its own build (kept). The scripted endpoint plays the setup agent, first with a recipe
that cannot work offline, then with one that does. Kept environments are checked through
`dsv eval`'s task file: the reference fix passes the verifier, the parent commit fails it.
A hostile setup agent's commands (network, writes outside the workdir, a run that never
ends) are contained by the sandbox and reported. Answers whose code prints forged result lines
(or reads what the runner's reporter left behind) do not pass a Python task.

Run: pytest packages/synth/tests/test_synth_repo_envs.py
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dsv.synth import registry
from dsv.synth.eval.client import EndpointClient
from dsv.synth.pipeline.repo_envs import RepoEnvsConfig, build_repo_envs, classify, find_repositories
from dsv.synth.repo_env import protected_paths, run_suite
from dsv.synth.repo_langs import (
    adapter_for,
    detect_language,
    parse_junit_xml,
    parse_reported,
    parse_tap,
    parse_unittest,
)
from dsv.synth.sandbox import Limits, isolation_report
from dsv.synth.tasks import read_tasks


def _load_scripted():
    path = Path(__file__).with_name("scripted_endpoint.py")
    spec = importlib.util.spec_from_file_location("dsv_synth_tests_scripted_endpoint", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


se = _load_scripted()
pytestmark = pytest.mark.xdist_group("synth_repo_envs")

needs_node = pytest.mark.skipif(
    subprocess.run(["sh", "-c", "command -v node"], capture_output=True).returncode != 0,
    reason="node is not installed",
)


needs_java = pytest.mark.skipif(
    not (shutil.which("javac") and shutil.which("java")), reason="no JDK (javac, java) is installed"
)


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}  # fmt: skip
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env).stdout


def _commit(repo: Path, files: dict[str, str], message: str) -> str:
    for path, content in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(content)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", message)
    return _git(repo, "rev-parse", "HEAD").strip()


def _init(root: Path, name: str) -> Path:
    repo = root / name
    repo.mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    return repo


CALC_TEST = """import unittest

from calc import add, mean


class TestCalc(unittest.TestCase):
    def test_add(self):
        self.assertEqual(add(2, 3), 5)

    def test_mean(self):
        self.assertEqual(mean([1, 2, 3]), 2)
"""


def _order_dependent_words() -> tuple[str, str]:
    """Two words whose set order differs between the Python reruns (PYTHONHASHSEED 1, 2, 3) in the sandbox."""
    python3 = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")  # what the sandbox's PATH finds
    assert python3, "no python3 on the sandbox's PATH"
    for a, b in (("red", "blue"), ("ham", "egg"), ("cat", "dog"), ("sun", "moon"), ("oak", "elm"), ("x1", "y2")):
        orders = {
            subprocess.run(
                [python3, "-c", f"print(list({{{a!r}, {b!r}}}))"],
                env={"PYTHONHASHSEED": str(seed)}, capture_output=True, text=True, check=True,
            ).stdout
            for seed in (1, 2, 3)
        }
        if len(orders) > 1:
            return a, b
    raise AssertionError("no word pair changes set order across the rerun seeds")


def make_repos(root: Path) -> dict[str, object]:
    """The test repositories and their issue / pull-request records (GitHub API shape)."""
    calc = _init(root, "calc")
    _commit(calc, {"calc.py": "def add(a, b):\n    return a + b\n\n\ndef mean(xs):\n    return sum(xs) / len(xs)\n",
                   "tests/__init__.py": "", "tests/test_calc.py": CALC_TEST,
                   "README.md": "calc: small arithmetic helpers.\n"}, "Initial calc")  # fmt: skip
    calc_fix = _commit(
        calc,
        {"calc.py": "def add(a, b):\n    return a + b\n\n\ndef mean(xs):\n    return sum(xs) / len(xs) if xs else 0.0\n",
         "tests/test_calc.py": CALC_TEST + "\n    def test_mean_empty(self):\n        self.assertEqual(mean([]), 0.0)\n"},
        "Return 0.0 for the mean of an empty list\n\nFixes #1",
    )  # fmt: skip
    untested_fix = _commit(calc, {"calc.py": "def add(a, b):\n    return b + a\n\n\ndef mean(xs):\n"
                                  "    return sum(xs) / len(xs) if xs else 0.0\n"}, "Tidy add (closes #2)")  # fmt: skip

    a, b = _order_dependent_words()
    tags = _init(root, "tags")
    base_test = "import unittest\n\nfrom tags import split_tags\n\n\nclass TestTags(unittest.TestCase):\n"
    base_test += "    def test_split(self):\n        self.assertEqual(split_tags('a,b'), ['a', 'b'])\n"
    _commit(tags, {"tags.py": "def split_tags(text):\n    return text.split(',')\n",
                   "test_tags.py": base_test}, "Initial tags")  # fmt: skip
    flaky_fix = _commit(
        tags,
        {"tags.py": "def split_tags(text):\n    return text.split(',')\n\n\ndef unique_tags(text):\n"
                    "    return list(set(split_tags(text)))\n",
         "test_unique.py": "import unittest\n\nfrom tags import unique_tags\n\n\nclass TestUnique(unittest.TestCase):\n"
         f"    def test_unique(self):\n        self.assertEqual(unique_tags('{a},{b},{a}'), ['{a}', '{b}'])\n"},
        "Add unique_tags (fixes #3)",
    )  # fmt: skip

    js = _init(root, "jsutil")
    js_test = ("const test = require('node:test');\nconst assert = require('node:assert');\n"
               "const { clamp } = require('../lib.js');\n\n"
               "test('clamp keeps values inside', () => { assert.strictEqual(clamp(5, 0, 10), 5); });\n")  # fmt: skip
    _commit(js, {"package.json": '{"name": "jsutil", "version": "1.0.0", "scripts": {"test": "node --test"}}\n',
                 "lib.js": "exports.clamp = (x, lo, hi) => Math.max(lo, x);\n",
                 "test/lib.test.js": js_test}, "Initial jsutil")  # fmt: skip
    _git(js, "checkout", "-q", "-b", "fix-clamp")
    js_fix = _commit(
        js,
        {"lib.js": "exports.clamp = (x, lo, hi) => Math.min(hi, Math.max(lo, x));\n",
         "test/lib.test.js": js_test + "test('clamp caps at hi', () => { assert.strictEqual(clamp(15, 0, 10), 10); });\n"},
        "Cap clamp at hi",
    )  # fmt: skip
    _git(js, "checkout", "-q", "main")
    api = "https://api.github.com/repos/acme"
    issues = [
        {"number": 1, "title": "mean() crashes on an empty list", "state": "closed",
         "body": "`mean([])` raises ZeroDivisionError; it should return 0.0.", "repository_url": f"{api}/calc"},
        {"number": 2, "title": "add reads oddly", "body": "Write add as b + a.", "repository_url": f"{api}/calc"},
        {"number": 3, "title": "Need unique tags", "body": "Add unique_tags(text) returning each tag once, "
         "in first-seen order.", "repository_url": f"{api}/tags"},
        {"number": 7, "title": "clamp ignores the upper bound", "body": "clamp(15, 0, 10) returns 15, not 10.",
         "repository_url": f"{api}/jsutil"},
        {"number": 8, "title": "A pull request listed by the issues API", "body": "", "pull_request": {},
         "repository_url": f"{api}/jsutil"},
    ]  # fmt: skip
    pulls = [{"number": 9, "title": "Cap clamp at hi", "body": "Fixes #7.", "merge_commit_sha": js_fix,
              "base": {"sha": "x", "repo": {"name": "jsutil", "full_name": "acme/jsutil"}}}]  # fmt: skip
    (root / "issues.json").write_text(json.dumps(issues))
    (root / "pulls.json").write_text(json.dumps(pulls))
    return {"calc_fix": calc_fix, "untested_fix": untested_fix, "flaky_fix": flaky_fix, "js_fix": js_fix,
            "words": (a, b)}  # fmt: skip


def _fence(obj: object) -> str:
    return "Here is the recipe.\n```json\n" + json.dumps(obj) + "\n```\n"


def setup_agent(body: dict) -> se.Reply:
    """The scripted setup agent: for Python, first a pip install (no network), then unittest."""
    text = "\n".join(str(m.get("content")) for m in body["messages"])
    if "language: javascript" in text:
        return se.Reply(content=_fence({"install": "true", "test": "node --test"}))
    if "That did not work" in text:
        return se.Reply(content=_fence({"install": "true", "test": "python3 -m unittest discover -v"}))
    return se.Reply(content=_fence({"install": "python3 -m pip install -e .", "test": "python3 -m pytest -rA"}))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("repos")
    refs = make_repos(root)
    out = root / "out"
    with se.ScriptedEndpoint(setup_agent) as endpoint:
        client = EndpointClient(endpoint.base_url, endpoint.model, max_retries=0)
        config = RepoEnvsConfig(out_dir=out, issues=root / "issues.json", pulls=root / "pulls.json", reruns=3)
        report = build_repo_envs(client, config, find_repositories(root))
        again = build_repo_envs(client, config, find_repositories(root))
        client.close()
        n_requests = len(endpoint.requests)
    return {"root": root, "out": out, "report": report, "again": again, "refs": refs, "requests": n_requests}


def _by_issue(report: dict) -> dict[tuple[str, int], dict]:
    return {(r["repo"], r["issue"]): r for r in report["candidates"]}


def test_the_right_environments_are_kept_and_the_others_rejected_with_reasons(built) -> None:
    rows = _by_issue(built["report"])
    assert set(rows) == {("calc", 1), ("calc", 2), ("tags", 3), ("jsutil", 7)}
    calc, untested, flaky, js = rows["calc", 1], rows["calc", 2], rows["tags", 3], rows["jsutil", 7]
    assert calc["status"] == "accepted" and calc["fail_to_pass"] == ["tests.test_calc.TestCalc.test_mean_empty"]
    assert calc["pass_to_pass"] == ["tests.test_calc.TestCalc.test_add", "tests.test_calc.TestCalc.test_mean"]
    assert js["status"] == "accepted" and js["fix"] == built["refs"]["js_fix"]
    assert js["fail_to_pass"] == ["clamp caps at hi"] and js["pass_to_pass"] == ["clamp keeps values inside"]
    assert untested["category"] == "no_tests" and "changes no test file" in untested["reason"]
    assert flaky["category"] == "flaky" and flaky["flaky"] == ["test_unique.TestUnique.test_unique"]
    assert flaky["pass_to_pass"] == ["test_tags.TestTags.test_split"]
    report = built["report"]
    assert report["counts"] == {"total": 4, "accepted": 2, "rejected": 2, "error": 0, "pending": 0}
    assert report["acceptance_rate"] == 0.5 and report["envs_per_minute"] > 0
    md = (built["out"] / "report.md").read_text()
    assert "| flaky | 1 |" in md and "| no_tests | 1 |" in md and "changes no test file" in md


def test_setup_agent_retries_until_the_suite_runs_and_the_recipe_is_kept(built) -> None:
    calc = built["report"]["setups"]["calc"]
    first, second = calc["attempts"][:2]
    assert first["recipe"]["install"].startswith("python3 -m pip") and first["install_rc"] != 0
    assert "install command exited" in first["problem"]
    assert second["tests_found"] >= 3 and second["problem"] == ""
    assert calc["recipe"] == {"install": "true", "test": "python3 -m unittest discover -v"}
    # one conversation per repository: calc's second candidate (no tests) never asked, tags asked twice, js once
    assert built["requests"] == 2 + 2 + 1


def test_rerun_resumes_without_asking_again_and_the_task_file_is_complete(built) -> None:
    assert built["again"]["counts"] == built["report"]["counts"]
    tasks = read_tasks(built["out"] / "tasks.jsonl")
    assert sorted(t.state["repo"] for t in tasks) == ["calc", "jsutil"]
    assert all(t.family == "repo_issue" and t.state["fail_to_pass"] for t in tasks)
    # unittest's reporter covered the Python task; node's TAP is read from its text
    assert {t.state["repo"]: t.state["trusted_results"] for t in tasks} == {"calc": True, "jsutil": False}


@pytest.mark.parametrize("repo", ["calc", pytest.param("jsutil", marks=needs_node)])
def test_reference_fix_passes_the_verifier_and_the_parent_fails_it(built, repo: str) -> None:
    task = next(t for t in read_tasks(built["out"] / "tasks.jsonl") if t.state["repo"] == repo)
    env = registry.get(task.family)  # what `dsv eval --tasks` and `dsv rl` resolve
    assert env.verify(task, env.solve(task)).passed
    parent = env.verify(task, {})
    assert not parent.passed and "fail-to-pass" in parent.reason
    # an answer that edits the hidden test to pass is overruled: the hidden tests are laid over it
    test_path = next(p for p in task.state["hidden_tests"])
    cheat = {test_path: "// nothing to see\n" if repo == "jsutil" else "pass\n"}
    assert not env.verify(task, cheat).passed
    for path in ("../outside.py", "/etc/passwd", ".git/config", "ok.py\n../../x"):
        assert "not a relative path inside the repository" in env.verify(task, {path: ""}).reason


def test_episode_with_the_code_tools_solves_the_python_task(built) -> None:
    from dsv.synth.episode import run_episode

    task = next(t for t in read_tasks(built["out"] / "tasks.jsonl") if t.state["repo"] == "calc")
    env = registry.get("repo_issue")
    names = [t["function"]["name"] for t in task.tools]
    assert names == ["list_files", "read_file", "search", "write_file", "run_tests"] == list(type(env).tool_names)
    fixed = task.state["solution"]["calc.py"]
    script = iter([
        {"tool_calls": [{"id": "1", "function": {"name": "search", "arguments": json.dumps({"pattern": "def mean"})}}]},
        {"tool_calls": [{"id": "2", "function": {"name": "write_file",
                                                 "arguments": json.dumps({"path": "calc.py", "content": fixed})}}]},
        {"tool_calls": [{"id": "3", "function": {"name": "run_tests", "arguments": "{}"}}]},
        {"content": "Answer: {}"},
    ])  # fmt: skip
    result = run_episode(env, task, lambda messages, tools: next(script))
    assert "calc.py:5: def mean(xs):" in result.trace[0].result
    assert result.trace[2].result.startswith("2 passed, 0 failed")  # the visible suite: hidden tests stay hidden
    assert result.score.passed, result.score.reason


def test_result_parsers_and_rerun_classification() -> None:
    out = (
        "test_a (m.T.test_a) ... ok\ntest_b (m.T.test_b)\nDoc line. ... FAIL\n"
        "test_c (m.T.test_c) ... skipped 'no'\nERROR: setUpClass (m.U)\n"
    )
    assert parse_unittest(out) == {"m.T.test_a": "pass", "m.T.test_b": "fail", "m.T.test_c": "skip",
                                   "m.U.setUpClass": "fail"}  # fmt: skip
    tap = "    ok 1 - inner\n    not ok 2 - bad\nnot ok 1 - group\nok 2 - solo # SKIP later\nok 3 - top\n"
    assert parse_tap(tap) == {"group > inner": "pass", "group > bad": "fail", "solo": "skip", "top": "pass"}
    before = [{"a": "fail", "b": "pass", "c": "pass"}, {"b": "pass", "c": "fail"}]
    after = [{"a": "pass", "b": "pass", "c": "pass"}, {"a": "pass", "b": "pass", "c": "pass"}]
    assert classify(before, after) == (["a"], ["b"], ["c"])
    tag = "@@dsv-result-" + "ab" * 16
    reported = f"{tag} pass m.T.a\nok 1 - x\n{tag} fail m.T.b\n{tag} pass m.T.b\n@@dsv-result-{'0' * 32} pass m.T.c\n"
    assert parse_reported(reported, tag) == {"m.T.a": "pass", "m.T.b": "fail"}
    edits = {"src/a.py": "", "tests/helpers.py": "", "run_tests.sh": "", "Makefile": "", "package.json": "",
             "tools/x.sh": "", "conftest.py": ""}  # fmt: skip
    assert protected_paths(edits, "python", {"install": "true", "test": "sh ./run_tests.sh -v && make check"}) == {
        "tests/helpers.py", "run_tests.sh", "Makefile", "conftest.py"}  # fmt: skip
    assert protected_paths(edits, "javascript", {"install": "npm ci", "test": "npm test"}) == {"package.json"}
    assert protected_paths({"x.py": ""}, "python", {"test": "sh -c 'unbalanced"}) == set()


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:
        type(self).hits.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return


@pytest.mark.skipif(
    not (isolation_report()["network_namespace"] and isolation_report()["private_filesystem"]),
    reason="containing network access and writes needs network namespaces and a private root (root host)",
)
def test_hostile_setup_agent_is_contained_and_reported(tmp_path: Path) -> None:
    root = tmp_path / "repos"
    make_repos(root)
    only_calc = tmp_path / "only"
    only_calc.mkdir()
    (root / "calc").rename(only_calc / "calc")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    escape = tmp_path / "escaped.txt"
    hostile = [
        {"install": f"python3 -c \"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{port}/x')\"",
         "test": "true"},
        {"install": f"echo pwned > {escape}; touch /dsv-escape-root", "test": "true"},
        {"install": "sleep 600", "test": "true"},
        {"install": "true", "test": "python3 -m unittest discover -v"},
    ]  # fmt: skip

    def agent(body: dict) -> se.Reply:
        turn = sum(m["role"] == "assistant" for m in body["messages"])
        return se.Reply(content=_fence(hostile[turn]))

    try:
        with se.ScriptedEndpoint(agent) as endpoint:
            client = EndpointClient(endpoint.base_url, endpoint.model, max_retries=0)
            config = RepoEnvsConfig(out_dir=tmp_path / "out", issues=root / "issues.json", reruns=1, setup_attempts=4,
                                    limits=Limits(cpu_s=10, wall_s=5, memory_mb=4096, max_processes=64))  # fmt: skip
            report = build_repo_envs(client, config, find_repositories(only_calc / "calc"))
            client.close()
    finally:
        server.shutdown()
        server.server_close()
    assert _Recorder.hits == [] and not escape.exists() and not Path("/dsv-escape-root").exists()
    attempts = report["setups"]["calc"]["attempts"]
    assert [a["status"] for a in attempts] == ["error", "error", "timeout", "ok"]
    assert any("network access attempted: blocked" in n for n in attempts[0]["contained"])
    assert any("write outside the workdir attempted: refused" in n for n in attempts[1]["contained"])
    assert any("time limit" in n for n in attempts[2]["contained"]) and attempts[2]["wall_s"] < 30
    assert _by_issue(report)["calc", 1]["status"] == "accepted"
    md = (tmp_path / "out" / "report.md").read_text()
    assert "network access attempted: blocked" in md and "ran past the time limit" in md


def test_cli_builds_and_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dsv.synth.cli import synth_app

    root = tmp_path / "repos"
    root.mkdir()
    runner = CliRunner()
    r = runner.invoke(synth_app, ["repo-envs", str(root), "--issues", str(tmp_path / "none.json"),
                                  "--endpoint", "http://127.0.0.1:9/v1", "--model", "m"])  # fmt: skip
    assert r.exit_code == 1 and "neither a git repository" in r.output and "Traceback" not in r.output
    make_repos(root)
    (root / "bad.json").write_text("{not json")
    args = [str(root), "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(tmp_path / "o")]
    r = runner.invoke(synth_app, ["repo-envs", *args, "--issues", str(root / "bad.json")])
    assert r.exit_code == 1 and "is not JSON" in r.output and len(r.output.strip().splitlines()) == 1
    r = runner.invoke(synth_app, ["repo-envs", *args, "--issues", str(root / "issues.json"), "--language", "cobol"])
    assert r.exit_code == 2 and "unsupported language 'cobol'" in r.output
    with se.ScriptedEndpoint(setup_agent) as endpoint:
        ok = [str(root / "calc"), "--endpoint", endpoint.base_url, "--model", endpoint.model,
              "--out", str(tmp_path / "cli"), "--issues", str(root / "issues.json"), "--reruns", "1"]  # fmt: skip
        r = runner.invoke(synth_app, ["repo-envs", *ok])
    assert r.exit_code == 0, r.output
    assert "1 accepted" in r.output and "no_tests: 1" in r.output
    assert len(read_tasks(tmp_path / "cli" / "tasks.jsonl")) == 1
    assert re.search(r"acceptance_rate: `0\.5`", (tmp_path / "cli" / "report.md").read_text())


def test_dsv_eval_reads_the_task_file_and_scores_in_the_sandbox(built, tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from dsv.synth.eval.cli import eval_command

    tasks = {t.state["repo"]: t for t in read_tasks(built["out"] / "tasks.jsonl")}

    def model(body: dict) -> se.Reply:  # solves calc with the reference fix, submits nothing for jsutil
        prompt = str(body["messages"][0]["content"])
        answer = tasks["calc"].state["solution"] if "repository calc." in prompt else {}
        return se.Reply(content=f"Answer: {json.dumps(answer)}")

    app = typer.Typer()
    app.command()(eval_command)
    with se.ScriptedEndpoint(model) as endpoint:
        args = ["--endpoint", endpoint.base_url, "--model", endpoint.model, "--tasks", str(built["out"] / "tasks.jsonl"),
                "--no-thinking", "--out", str(tmp_path / "eval")]  # fmt: skip
        r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    results = {rec["task_id"]: rec for rec in map(json.loads, (tmp_path / "eval" / "results.jsonl").open())}
    assert results[tasks["calc"].id]["passed"] and not results[tasks["jsutil"].id]["passed"]
    assert "fail-to-pass" in results[tasks["jsutil"].id]["reason"]


def test_fixes_in_existing_task_files_are_not_built_again(built, tmp_path: Path) -> None:
    only = tmp_path / "only"
    only.mkdir()
    subprocess.run(["git", "clone", "-q", str(built["root"] / "calc"), str(only / "calc")], check=True)
    config = RepoEnvsConfig(out_dir=tmp_path / "out", issues=built["root"] / "issues.json",
                            existing=(built["out"] / "tasks.jsonl",))  # fmt: skip
    with se.ScriptedEndpoint(setup_agent) as endpoint:
        client = EndpointClient(endpoint.base_url, endpoint.model, max_retries=0)
        report = build_repo_envs(client, config, find_repositories(only / "calc"))
        client.close()
        assert endpoint.requests == []
    assert _by_issue(report)["calc", 1]["category"] == "duplicate"
    assert read_tasks(tmp_path / "out" / "tasks.jsonl") == []


# ---- Java -----------------------------------------------------------------------------------

# A plain runner as small projects without JUnit have: every public no-argument method named test*
# of the classes named on the command line, in name order, reported as TAP.
TAP_RUNNER = """import java.lang.reflect.Method;
import java.util.Arrays;
import java.util.Comparator;

public class TapRunner {
    public static void main(String[] args) throws Exception {
        int n = 0;
        int failed = 0;
        for (String name : args) {
            Class<?> cls = Class.forName(name);
            Method[] methods = cls.getDeclaredMethods();
            Arrays.sort(methods, Comparator.comparing(Method::getName));
            for (Method m : methods) {
                if (!m.getName().startsWith("test") || m.getParameterCount() != 0) continue;
                n++;
                try {
                    m.invoke(cls.getDeclaredConstructor().newInstance());
                    System.out.println("ok " + n + " - " + name + "." + m.getName());
                } catch (java.lang.reflect.InvocationTargetException e) {
                    failed++;
                    System.out.println("not ok " + n + " - " + name + "." + m.getName());
                    System.out.println("  # " + e.getCause());
                }
            }
        }
        System.out.println("1.." + n);
        System.exit(failed == 0 ? 0 : 1);
    }
}
"""

STATS_TEST = """public class StatsTest {
    static void check(boolean ok, String what) {
        if (!ok) throw new AssertionError(what);
    }

    public void testMaxPositive() {
        check(Stats.max(new int[] {1, 5, 3}) == 5, "max of 1, 5, 3");
    }

    public void testSum() {
        check(Stats.sum(new int[] {1, 2, 3}) == 6, "sum of 1, 2, 3");
    }
"""

JAVA_RECIPE = {"install": "mkdir -p out && javac -d out src/*.java test/*.java",
               "test": "java -Xshare:auto -cp out TapRunner StatsTest"}  # fmt: skip


def make_java_repo(root: Path) -> str:
    """A Java project whose fix (with a new test) makes max() right for all-negative input."""
    repo = _init(root, "jstats")
    body = "    public static int sum(int[] xs) {\n        int s = 0;\n        for (int x : xs) s += x;\n        return s;\n    }\n"
    _commit(repo, {"src/Stats.java": "public class Stats {\n    public static int max(int[] xs) {\n        int m = 0;\n"
                   "        for (int x : xs) if (x > m) m = x;\n        return m;\n    }\n\n" + body + "}\n",
                   "test/TapRunner.java": TAP_RUNNER, "test/StatsTest.java": STATS_TEST + "}\n",
                   "README.md": "jstats: statistics over int arrays.\n"}, "Initial jstats")  # fmt: skip
    fix = _commit(
        repo,
        {"src/Stats.java": "public class Stats {\n    public static int max(int[] xs) {\n        int m = xs[0];\n"
                           "        for (int x : xs) if (x > m) m = x;\n        return m;\n    }\n\n" + body + "}\n",
         "test/StatsTest.java": STATS_TEST + "\n    public void testMaxNegative() {\n"
                                "        check(Stats.max(new int[] {-4, -2, -9}) == -2, \"max of negatives\");\n    }\n}\n"},
        "max() of negative numbers returned 0\n\nFixes #4",
    )  # fmt: skip
    api = "https://api.github.com/repos/acme"
    issues = [{"number": 4, "title": "max() is 0 for negative arrays", "repository_url": f"{api}/jstats",
               "body": "Stats.max(new int[] {-4, -2, -9}) returns 0; it should return -2."}]  # fmt: skip
    (root / "issues.json").write_text(json.dumps(issues))
    return fix


@needs_java
def test_java_repository_is_kept_and_its_reference_passes_while_the_parent_fails(tmp_path: Path) -> None:
    root = tmp_path / "repos"
    root.mkdir()
    fix = make_java_repo(root)

    def agent(body: dict) -> se.Reply:
        text = "\n".join(str(m.get("content")) for m in body["messages"])
        assert "language: java" in text and "TAP" in text  # the adapter's output hint reached the agent
        return se.Reply(content=_fence(JAVA_RECIPE))

    with se.ScriptedEndpoint(agent) as endpoint:
        client = EndpointClient(endpoint.base_url, endpoint.model, max_retries=0)
        config = RepoEnvsConfig(out_dir=tmp_path / "out", issues=root / "issues.json", reruns=2)
        report = build_repo_envs(client, config, find_repositories(root))
        client.close()
    row = _by_issue(report)["jstats", 4]
    assert row["status"] == "accepted", row
    assert row["fix"] == fix and row["fail_to_pass"] == ["StatsTest.testMaxNegative"]
    assert row["pass_to_pass"] == ["StatsTest.testMaxPositive", "StatsTest.testSum"]
    (task,) = read_tasks(tmp_path / "out" / "tasks.jsonl")
    assert task.state["language"] == "java" and set(task.state["hidden_tests"]) == {"test/StatsTest.java"}
    assert set(task.state["solution"]) == {"src/Stats.java"}
    assert not task.state["trusted_results"]  # no reporter for Java: results are read from the TAP text
    env = registry.get(task.family)
    assert env.verify(task, env.solve(task)).passed
    parent = env.verify(task, {})
    assert not parent.passed and "1 fail-to-pass test(s) still fail: StatsTest.testMaxNegative" in parent.reason
    # an answer that rewrites the suite's runner to report success is not applied
    lying_runner = TAP_RUNNER.replace('System.out.println("not ok " + n', 'System.out.println("ok " + n')
    st = task.state
    run = run_suite(st["snapshot"], {"test/TapRunner.java": lying_runner, **st["hidden_tests"]}, st["recipe"], "java")
    assert run.results["StatsTest.testMaxNegative"] == "pass"  # what reading its text alone would believe
    lie = env.verify(task, {"test/TapRunner.java": lying_runner})
    assert not lie.passed and "edits to 1 test or test-runner file(s) were not applied" in lie.reason
    # an answer that does not compile leaves no results at all
    broken = env.verify(task, {"src/Stats.java": "public class Stats { oops }\n"})
    assert not broken.passed and "install command exited" in broken.reason


def test_java_adapter_reads_tap_and_junit_xml_and_finds_test_files() -> None:
    xml = (
        'noise before\n<?xml version="1.0" encoding="UTF-8"?>\n'
        '<testsuite name="a.StatsTest" tests="3" failures="1" errors="0" skipped="1">\n'
        '  <testcase name="testMax()" classname="a.StatsTest" time="0.01"/>\n'
        '  <testcase name="testSum" classname="a.StatsTest"><failure message="x">trace</failure></testcase>\n'
        '  <testcase name="testSkip" classname="a.StatsTest"><skipped/></testcase>\n'
        "</testsuite>\nBUILD FAILURE\n"
        '<testsuite name="b.Other" tests="1"><testcase name="t" classname="b.Other"><error/></testcase></testsuite>\n'
    )
    assert parse_junit_xml(xml) == {"a.StatsTest.testMax": "pass", "a.StatsTest.testSum": "fail",
                                    "a.StatsTest.testSkip": "skip", "b.Other.t": "fail"}  # fmt: skip
    java = adapter_for("java")
    assert java.parse_results("ok 1 - StatsTest.testA\nnot ok 2 - StatsTest.testB\n1..2\n") == {
        "StatsTest.testA": "pass", "StatsTest.testB": "fail"}  # fmt: skip
    assert [java.is_test_file(p) for p in ("src/test/java/a/StatsTest.java", "StatsTests.java", "src/Stats.java",
                                           "test/TapRunner.java", "src/Testing.md")] == [True, True, False, True, False]  # fmt: skip
    assert detect_language(["pom.xml", "src/main/java/a/A.java", "scripts/x.py"]) == "java"


# ---- forged results -------------------------------------------------------------------------


def _forged_calc(extra: str) -> str:
    """calc.py with the bug left in, plus code that prints result lines claiming every test passed."""
    lines = [f"{n} (tests.test_calc.TestCalc.{n}) ... ok" for n in ("test_add", "test_mean", "test_mean_empty")]
    return (
        "import os\nimport sys\n\n\ndef add(a, b):\n    return a + b\n\n\ndef mean(xs):\n    return sum(xs) / len(xs)\n\n\n"
        f"FAKE = {lines!r}\n"
        "for line in FAKE:\n    print(line, file=sys.stderr)\n"
        "sys.stderr.flush()\n" + extra
    )


def test_answers_printing_forged_pass_lines_do_not_pass(built) -> None:
    task = next(t for t in read_tasks(built["out"] / "tasks.jsonl") if t.state["repo"] == "calc")
    assert task.state["trusted_results"]  # unittest's reporter covered every kept test
    env = registry.get("repo_issue")
    state = task.state
    forged_exit = {"calc.py": _forged_calc("os._exit(0)\n")}
    # The text parser alone would be fooled: the forged lines are all it sees.
    run = run_suite(state["snapshot"], {**forged_exit, **state["hidden_tests"]}, state["recipe"], "python")
    assert all(run.results.get(t) == "pass" for t in state["fail_to_pass"] + state["pass_to_pass"])
    assert run.reported == {}
    score = env.verify(task, forged_exit)
    assert not score.passed and "fail-to-pass test(s) still fail" in score.reason
    # Forged lines, then the tests really run: the reporter says the fix is missing.
    score = env.verify(task, {"calc.py": _forged_calc("")})
    assert not score.passed and score.reward == pytest.approx(2 / 3), score.reason
    # Forged lines in the reporter's own shape with a guessed tag, after looking for its files.
    snoop = (
        "import glob\nfound = glob.glob('../.dsv-r*') + glob.glob('/tmp/.dsv-r*') + glob.glob('/tmp/*')\n"
        "found += [p for p in sys.path if '.dsv-r' in p]\n"
        "print('SNOOP', os.environ.get('PYTHONUSERBASE'), found, sorted(os.listdir('..')), flush=True)\n"
        "for name in ('test_add', 'test_mean', 'test_mean_empty'):\n"
        "    print(f'@@dsv-result-{\"0\" * 32} pass tests.test_calc.TestCalc.{name}', flush=True)\n"
    )
    answer = {"calc.py": _forged_calc(snoop)}
    run = run_suite(state["snapshot"], {**answer, **state["hidden_tests"]}, state["recipe"], "python")
    snooped = next(line for line in run.output.splitlines() if line.startswith("SNOOP"))
    assert snooped == "SNOOP None [] ['repo']", snooped
    assert run.reported is not None and run.reported["tests.test_calc.TestCalc.test_mean_empty"] == "fail"
    assert not env.verify(task, answer).passed
    # The reference still passes, and the tagged lines never reach what the agent is shown.
    run = run_suite(state["snapshot"], {**state["solution"], **state["hidden_tests"]}, state["recipe"], "python")
    assert run.reported == run.results and "@@dsv-result-" not in run.output
    assert "test_add (tests.test_calc.TestCalc.test_add) ... ok\ntest_mean (" in run.output


@pytest.mark.skipif(
    not isolation_report()["unprivileged_uid"], reason="killing the install step's leftovers needs the sandbox's own uid"
)
def test_a_process_left_by_the_install_step_cannot_read_the_reporter(built) -> None:
    task = next(t for t in read_tasks(built["out"] / "tasks.jsonl") if t.state["repo"] == "calc")
    # The install step starts a watcher that copies whatever the reporter writes; the answer's code
    # then replays the tag it would have learnt. The watcher is killed before the reporter exists.
    watcher = "(while :; do cat /tmp/.dsv-r*/m/*.py ../.dsv-r*/m/*.py >> leak.txt 2>/dev/null; done) >/dev/null 2>&1 &"
    recipe = {"install": f"{watcher} sleep 0.2", "test": task.state["recipe"]["test"]}
    replay = (
        "import re\ntext = open('leak.txt').read() if os.path.exists('leak.txt') else ''\n"
        "print('LEAKED', len(text), flush=True)\n"
        "for tag in set(re.findall(r'@@dsv-result-[0-9a-f]+', text)):\n"
        "    for name in ('test_add', 'test_mean', 'test_mean_empty'):\n"
        "        print(f'{tag} pass tests.test_calc.TestCalc.{name}', flush=True)\n"
        "os._exit(0)\n"
    )
    state = {**task.state, "recipe": recipe}
    forged = type(task)(**{**task.__dict__, "state": state})
    answer = {"calc.py": _forged_calc(replay)}
    run = run_suite(state["snapshot"], {**answer, **state["hidden_tests"]}, recipe, "python")
    assert "LEAKED 0" in run.output, run.output[-2000:]
    assert not registry.get("repo_issue").verify(forged, answer).passed


@needs_java
@pytest.mark.skipif(not isolation_report()["private_filesystem"], reason="the private root needs root")
def test_the_java_toolchain_exposes_only_what_the_jdk_needs_from_etc() -> None:
    from dsv.synth.sandbox import run_command

    probe = ["/bin/sh", "-c", "ls /etc; test -e /etc/passwd && echo PASSWD; java -version 2>&1 | head -1"]
    java_env = adapter_for("java").env()
    jvm = Limits(cpu_s=20, wall_s=30, memory_mb=4096, max_processes=128)  # a JVM reserves much address space
    argv = ["/usr/bin/env", *(f"{k}={v}" for k, v in java_env.items()), *probe]
    r = run_command(argv, toolchains=["java"], limits=jvm)
    assert r.status == "ok", r
    listed = r.stdout.splitlines()
    assert "alternatives" in listed and "PASSWD" not in r.stdout and "version" in r.stdout
    assert all(name == "alternatives" or name.startswith("java") for name in listed[:-1]), listed
    plain = run_command(probe, limits=jvm)
    assert "alternatives" not in plain.stdout and "version" not in plain.stdout
    with pytest.raises(ValueError, match="unknown sandbox toolchain 'cobol'"):
        run_command(["/bin/true"], toolchains=["cobol"])


def test_user_site_code_from_the_install_step_runs_after_the_reporter_has_gone(built) -> None:
    task = next(t for t in read_tasks(built["out"] / "tasks.jsonl") if t.state["repo"] == "calc")
    # The install step plants a .pth file in the user site-packages (as `pip install --user -e .`
    # does): Python runs it at start-up, before any test. It looks for the reporter's files and
    # forges tagged lines with whatever tag it finds, then ends the process.
    planted = (
        "import glob, os, re, sys; found = [open(p).read() for p in glob.glob('/tmp/.dsv-r*/m/*.py') + glob.glob('../.dsv-r*/m/*.py')]; "
        "tags = set(re.findall(r'@@dsv-result-[0-9a-f]+', ''.join(found))); "
        "print('PTH RAN', len(found), file=sys.stderr, flush=True); "
        "[print(f'{t} pass tests.test_calc.TestCalc.{n}', flush=True) for t in tags "
        "for n in ('test_add', 'test_mean', 'test_mean_empty')]; tags and os._exit(0)"
    )
    site_dir = "$(python3 -c 'import site; print(site.getusersitepackages())')"
    install = f'd={site_dir} && mkdir -p "$d" && cat > "$d/planted.pth" <<\'EOF\'\n{planted}\nEOF'
    recipe = {"install": install, "test": task.state["recipe"]["test"]}
    state = {**task.state, "recipe": recipe}
    run = run_suite(state["snapshot"], {**state["solution"], **state["hidden_tests"]}, recipe, "python")
    assert "PTH RAN 0" in run.output, run.output[-2000:]  # it ran, after the reporter's files were gone
    assert run.reported == run.results and run.reported["tests.test_calc.TestCalc.test_mean_empty"] == "pass"
    run = run_suite(state["snapshot"], dict(state["hidden_tests"]), recipe, "python")
    assert run.reported is not None and run.reported["tests.test_calc.TestCalc.test_mean_empty"] == "fail"
    forged = type(task)(**{**task.__dict__, "state": state})
    assert not registry.get("repo_issue").verify(forged, {}).passed
