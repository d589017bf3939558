"""`dsv synth build` end to end: a real scripted endpoint proposes good, broken and hostile environments.

Every proposal runs through the real sandbox. The test checks each one is kept or
rejected for the right reason, that the library entry works through the sandboxed
adapter, that re-running resumes without asking the endpoint again, and that the
`dsv synth build` command prints a one-line error for bad input.

Run: pytest packages/synth/tests/test_synth_pipeline.py
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import sys
from pathlib import Path

import pytest

from dsv.synth.episode import run_episode
from dsv.synth.eval.client import EndpointClient
from dsv.synth.pipeline.build import BuildConfig, build
from dsv.synth.pipeline.harness import default_limits
from dsv.synth.pipeline.library import Library


def _load_scripted():
    path = Path(__file__).with_name("scripted_endpoint.py")
    spec = importlib.util.spec_from_file_location("dsv_synth_tests_scripted_endpoint", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


se = _load_scripted()

# the module fixture builds a whole library (~10 s): keep this file on one xdist worker so it is built once
pytestmark = pytest.mark.xdist_group("synth_pipeline")

GOOD = '''
from dsv.synth.env import Environment, Score, Task


class ProposedEnv(Environment):
    name = "vowel_count"
    domain = "text"
    description = "Count the vowels in a list of words, with a tool that reads one word."

    def generate(self, seed: int, difficulty: int = 2) -> Task:
        rng = self._rng(seed, difficulty)
        words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8)))
                 for _ in range(2 + difficulty)]
        prompt = "How many vowels (a, e, i, o, u) appear in total in these words: " + ", ".join(words) + "?"
        return self._task(seed, difficulty, prompt, {"words": words}, "Reply with <answer>INTEGER</answer>.")

    def tools(self, task: Task) -> list:
        words = task.state["words"]

        def word_at(index: int) -> str:
            """Return one of the task's words.

            Args:
                index: position of the word, starting at 0.
            """
            return words[index]

        return [word_at]

    def solve(self, task: Task):
        return sum(ch in "aeiou" for w in task.state["words"] for ch in w)

    def verify(self, task: Task, answer, trace=None) -> Score:
        if not isinstance(answer, int) or isinstance(answer, bool):
            return Score.fail("answer must be an integer")
        return Score.ok() if answer == self.solve(task) else Score.fail(f"wrong count {answer}")
'''

# A stateful environment: the verifier reads state that only the tools change, so the
# sandboxed adapter must replay earlier tool calls for it to work.
COUNTER = '''
from dsv.synth.env import Environment, Score, Task


class ProposedEnv(Environment):
    name = "tally_counter"
    domain = "planning"
    description = "Press a counter's button until it shows the target, then report the presses."

    def generate(self, seed: int, difficulty: int = 2) -> Task:
        rng = self._rng(seed, difficulty)
        target = rng.randint(1, 2 + difficulty)
        prompt = f"A tally counter starts at 0. Use press() until it shows {target}, then report the count."
        return self._task(seed, difficulty, prompt, {"target": target, "count": 0}, "Reply <answer>N</answer>.")

    def tools(self, task: Task) -> list:
        state = task.state

        def press() -> int:
            """Press the button once and read the counter."""
            state["count"] += 1
            return state["count"]

        return [press]

    def solve(self, task: Task):
        return task.state["target"]

    def verify(self, task: Task, answer, trace=None) -> Score:
        if answer != task.state["target"] or isinstance(answer, bool):
            return Score.fail("wrong number")
        if trace and task.state["count"] != task.state["target"]:
            return Score.fail(f"counter shows {task.state['count']}")
        return Score.ok()
'''


def _variant(code: str, name: str, extra: str = "") -> str:
    return code.replace('name = "vowel_count"', f'name = "{name}"') + extra


def _builtin_copy() -> str:
    from dsv.synth.families import maths

    source = inspect.getsource(maths)
    source = source.replace("from dsv.synth.registry import register\n", "").replace("@register\n", "")
    source = source.replace("class ArithmeticEnv(Environment):", "class ProposedEnv(Environment):")
    return source.replace('name = "arithmetic"', 'name = "expression_value"')


def _fence(code: str) -> str:
    return f"Here is my environment.\n\n```python\n{code}\n```\n"


def proposals(endpoint_url_holder: list[str]) -> dict[int, tuple[str, str]]:
    """index -> (expected status/category, reply text)."""
    accept_all = (
        _variant(GOOD, "vowel_lenient")
        .replace(
            'return Score.ok() if answer == self.solve(task) else Score.fail(f"wrong count {answer}")',
            "return Score.ok()",
        )
        .replace('return Score.fail("answer must be an integer")', "return Score.ok()")
    )
    reject_ref = (
        _variant(GOOD, "vowel_strict")
        .replace(
            'return sum(ch in "aeiou" for w in task.state["words"] for ch in w)',
            'return sum(ch in "aeiou" for w in task.state["words"] for ch in w) + 1',
        )
        .replace("answer == self.solve(task)", "answer == self.solve(task) - 1 and answer < 0")
    )
    loop = _variant(GOOD, "vowel_loop").replace(
        "rng = self._rng(seed, difficulty)", "while True:\n            pass"
    )
    network = _variant(GOOD, "vowel_net").replace(
        "rng = self._rng(seed, difficulty)",
        "import urllib.request\n"
        f"        urllib.request.urlopen({endpoint_url_holder[0] + '/chat/completions'!r}, data=b'{{}}', timeout=3)\n"
        "        rng = self._rng(seed, difficulty)",
    )
    huge = _variant(GOOD, "vowel_loud").replace(
        "rng = self._rng(seed, difficulty)",
        "print('x' * 5_000_000)\n        rng = self._rng(seed, difficulty)",
    )
    nondet = _variant(GOOD, "vowel_random").replace(
        "rng = self._rng(seed, difficulty)", "import random\n        rng = random.Random()"
    )
    renamed_dup = _variant(GOOD, "vowel_tally").replace("words", "items").replace("word_at", "item_at")
    return {
        0: ("accepted", _fence(GOOD)),
        1: (
            "syntax_error",
            _fence(GOOD.replace("def solve(self, task: Task):", "def solve(self, task: Task)")),
        ),
        2: ("timeout", _fence(loop)),
        3: ("accepts_wrong", _fence(accept_all)),
        4: ("reference_rejected", _fence(reject_ref)),
        5: ("network", _fence(network)),
        6: ("output_limit", _fence(huge)),
        7: ("duplicate_builtin", _fence(_builtin_copy())),
        8: ("duplicate_accepted", _fence(renamed_dup)),
        9: ("nondeterministic", _fence(nondet)),
        10: ("forbidden_import", _fence("import numpy\n" + _variant(GOOD, "vowel_np"))),
        11: ("no_code", "I would build a vowel counter, but here is only prose."),
        12: ("accepted", _fence(COUNTER)),
        13: ("name_taken", _fence(_variant(GOOD, "arithmetic"))),
    }


def _script(table: dict[int, tuple[str, str]]):
    def script(body: dict) -> se.Reply:
        user = se.last_user_text(body)
        m = re.search(r"environment number (\d+)", user)
        assert m, user
        return se.Reply(content=table[int(m.group(1))][1])

    return script


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("synth-build")
    holder: list[str] = []
    # the table needs the endpoint's URL (the network proposal targets it), the endpoint needs the table
    table_box: dict[int, tuple[str, str]] = {}
    endpoint = se.ScriptedEndpoint(_script(table_box)).start()
    holder.append(endpoint.base_url)
    table_box.update(proposals(holder))
    config = BuildConfig(out_dir=out, n=len(table_box), limits=default_limits(4.0), seeds=(0, 1))
    client = EndpointClient(endpoint.base_url, "scripted", timeout_s=30)
    report = build(client, config)
    yield {
        "out": out,
        "endpoint": endpoint,
        "client": client,
        "config": config,
        "report": report,
        "table": table_box,
    }
    client.close()
    endpoint.stop()


def test_each_proposal_gets_the_expected_verdict(built) -> None:
    report = built["report"]
    got = {p["index"]: (p["status"], p["category"]) for p in report["proposals"]}
    for i, (expected, _) in built["table"].items():
        status, category = got[i]
        if expected == "accepted":
            assert status == "accepted", (i, report["proposals"][i])
        else:
            assert (status, category) == ("rejected", expected), (i, report["proposals"][i])
    assert report["counts"] == {"total": 14, "accepted": 2, "rejected": 12, "error": 0, "pending": 0}
    assert report["by_category"]["accepted"] == 2
    md = (built["out"] / "report.md").read_text()
    assert "| duplicate_builtin | 1 |" in md and "2 accepted, 12 rejected" in md


def test_rejections_say_why(built) -> None:
    by_index = {p["index"]: p for p in built["report"]["proposals"]}
    assert "line" in by_index[1]["reason"]
    assert "timeout" in by_index[2]["reason"]
    assert "accepts the wrong answer" in by_index[3]["reason"]
    assert "rejects the reference" in by_index[4]["reason"]
    assert "arithmetic" in by_index[7]["reason"] and by_index[7]["closest"]["kind"] == "builtin"
    assert "vowel_count" in by_index[8]["reason"]
    assert "numpy" in by_index[10]["reason"]


def test_sandbox_blocked_the_network_attempt(built) -> None:
    # one request per proposal from the pipeline itself; the proposal's POST never arrived
    assert len(built["endpoint"].requests) == len(built["table"])
    for body in built["endpoint"].requests:
        assert body.get("model") == "scripted" and body["messages"][0]["role"] == "system"


def test_library_entries_are_atomic_pairs_and_work_through_the_sandbox(built) -> None:
    library = Library(built["config"].library)
    assert library.names() == ["tally_counter", "vowel_count"]
    manifest = library.manifest("vowel_count")
    assert manifest["checks"]["tasks_checked"] == 4 and manifest["prompts"]
    assert not list(Path(built["config"].library).glob(".*tmp"))
    env = library.environment("vowel_count")
    task = env.generate(5, 2)
    answer = env.solve(task)
    assert env.verify(task, answer).passed
    assert not env.verify(task, answer + 1).passed
    assert not env.verify(task, "five").passed
    assert env.parse_answer(f"thinking... <answer>{answer}</answer>") == answer


def test_stateful_library_environment_replays_tool_calls(built) -> None:
    env = Library(built["config"].library).environment("tally_counter")
    task = env.generate(1, 2)
    target = task.state["target"]
    presses = iter(range(target + 1))

    def policy(messages: list[dict], tools: list[dict]) -> dict:
        i = next(presses)
        if i < target:
            return {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": f"c{i}", "type": "function", "function": {"name": "press", "arguments": "{}"}}
                ],
            }
        return {"role": "assistant", "content": f"<answer>{target}</answer>"}

    result = run_episode(env, task, policy)
    assert [t.result for t in result.trace] == [str(k) for k in range(1, target + 1)]
    assert result.score.passed, result.score.reason


def test_rerun_resumes_without_asking_again(built) -> None:
    before = len(built["endpoint"].requests)
    bigger = BuildConfig(
        out_dir=built["out"], n=len(built["table"]), limits=default_limits(4.0), seeds=(0, 1)
    )
    report = build(built["client"], bigger)
    assert len(built["endpoint"].requests) == before
    assert report["counts"] == built["report"]["counts"]
    state = json.loads((built["out"] / "state.json").read_text())
    assert len(state["proposals"]) == len(built["table"])


def test_endpoint_failure_is_retried_on_the_next_run(tmp_path: Path) -> None:
    calls = {"n": 0}

    def flaky(body: dict) -> se.Reply:
        calls["n"] += 1
        if calls["n"] == 1:
            return se.Reply(content="overloaded", status=503)
        return se.Reply(content=_fence(GOOD))

    with se.ScriptedEndpoint(flaky) as endpoint:
        client = EndpointClient(endpoint.base_url, "scripted", max_retries=0)
        config = BuildConfig(out_dir=tmp_path, n=1, seeds=(0,))
        first = build(client, config)
        assert first["counts"]["error"] == 1 and "503" in first["proposals"][0]["reason"]
        second = build(client, config)
        assert second["counts"]["accepted"] == 1 and second["counts"]["error"] == 0
        client.close()


def test_build_command_errors_are_one_line(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from dsv.synth.pipeline.cli import build_command

    app = typer.Typer()
    app.command()(build_command)
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(
        app, ["--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(tmp_path / "file")]
    )
    assert result.exit_code == 1
    assert result.output.strip().startswith("error:") and len(result.output.strip().splitlines()) == 1


def test_build_command_runs_against_the_endpoint(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dsv.synth.cli import synth_app

    with se.ScriptedEndpoint(lambda body: se.Reply(content=_fence(COUNTER))) as endpoint:
        args = ["build", "--base-url", endpoint.base_url, "--model", "m", "-n", "2", "--out", str(tmp_path)]
        result = CliRunner().invoke(synth_app, [*args, "--seeds", "1"])
    assert result.exit_code == 0, result.output
    assert "1 accepted, 1 rejected" in result.output  # the second proposal reuses an accepted name
    assert Library(tmp_path / "library").names() == ["tally_counter"]


def test_builtin_families_are_not_duplicates_of_each_other() -> None:
    from dsv.synth.pipeline.build import builtin_fingerprints
    from dsv.synth.pipeline.dedup import find_duplicate

    config = BuildConfig(out_dir=Path("unused"))
    fps = builtin_fingerprints()
    assert len(fps) >= 2
    for fp in fps:
        others = [o for o in fps if o.name != fp.name]
        match = find_duplicate(
            fp,
            others,
            code_threshold=config.code_threshold,
            prompt_threshold=config.prompt_threshold,
            containment_threshold=config.containment_threshold,
        )
        assert match is not None and not match.duplicate, (fp.name, match)
        # and each family is a duplicate of itself, so the signals are live
        assert find_duplicate(fp, [fp], code_threshold=0.6, prompt_threshold=0.75).duplicate


def test_cli_generate_list_show_with_a_library(built, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dsv.synth.cli import synth_app
    from dsv.synth.tasks import read_tasks

    lib = str(built["config"].library)
    runner = CliRunner()
    out = tmp_path / "tasks.jsonl"
    args = [
        "generate",
        "vowel_count",
        "arithmetic",
        "--library",
        lib,
        "--n",
        "2",
        "--seed",
        "7",
        "--out",
        str(out),
    ]
    r = runner.invoke(synth_app, args)
    assert r.exit_code == 0, r.output
    tasks = read_tasks(out)
    assert [t.id for t in tasks] == ["vowel_count-2-7", "vowel_count-2-8", "arithmetic-2-7", "arithmetic-2-8"]
    # The generated tasks are the sandboxed generator's, and its verifier judges them after a round-trip.
    env = Library(lib).environment("vowel_count")
    assert tasks[0].to_json() == env.generate(7, 2).to_json()
    assert env.verify(tasks[0], env.solve(tasks[0])).passed
    assert tasks[0].tools[0]["function"]["name"] == "word_at"

    r = runner.invoke(synth_app, ["list", "--library", lib])
    assert r.exit_code == 0, r.output
    assert "tally_counter" in r.output and "vowel_count" in r.output and "arithmetic" in r.output
    r = runner.invoke(synth_app, ["show", "tally_counter", "--library", lib, "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert '"press"' in r.output and "reference" in r.output and "passed=True" in r.output

    # Without --library the name is unknown; a typo gets a suggestion from the library; a bad dir is one line.
    r = runner.invoke(synth_app, ["generate", "vowel_count", "--out", str(out)])
    assert r.exit_code == 1 and "unknown family 'vowel_count'" in r.output
    r = runner.invoke(synth_app, ["generate", "vowel_cont", "--library", lib, "--out", str(out)])
    assert r.exit_code == 1 and "did you mean vowel_count" in r.output
    r = runner.invoke(synth_app, ["list", "--library", str(tmp_path / "missing")])
    assert (
        r.exit_code == 1 and r.output.strip().startswith("error:") and len(r.output.strip().splitlines()) == 1
    )
    assert "Traceback" not in r.output
