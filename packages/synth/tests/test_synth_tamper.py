"""Hostile code cannot fake its own verdict: code_repair answers and `dsv synth build` proposals.

Run: pytest packages/synth/tests/test_synth_tamper.py

Each hostile program attacks the judge the way an in-process test runner could be attacked.
It patches the runner, writes a forged results file, prints "PASSED" or a forged result line,
and exits early. The verdict must still be a rejection, because judging happens in another
process from data the hostile code cannot make right without being right.
"""

from __future__ import annotations

import json

import pytest

from dsv.synth import safe_verify
from dsv.synth.families.code import CodeRepairEnv, HiddenTestFormatError, split_test
from dsv.synth.pipeline.harness import HarnessError, check_source, default_limits, run_harness

# Everything a hostile module can do at import time to a runner that shares its interpreter.
_TAMPER = """
import builtins, json, os, sys

names = {names!r}
open("_results.json", "w").write(json.dumps({{n: "pass" for n in names}}))
builtins.exec = lambda *a, **k: None
print("PASSED: all hidden tests pass")
mark = sys.argv[1] if len(sys.argv) > 1 else ""
all_true = {{f"{{i}}.{{j}}": {{"value": {{"t": "bool", "v": True}}}} for i in range(8) for j in range(8)}}
sys.stdout.write("\\n" + mark + json.dumps(all_true) + "\\n")
sys.stdout.write("\\n" + mark + json.dumps({{n: "pass" for n in names}}) + "\\n")
sys.stdout.flush()
os._exit(0)
"""


def _task_and_target(seed: int = 3) -> tuple[CodeRepairEnv, object, str, list[str]]:
    env = CodeRepairEnv()
    task = env.generate(seed, 3)
    solution = env.solve(task)
    path = sorted(solution)[0]
    names = [t["name"] for t in task.state["tests"]]
    return env, task, path, names


def test_hostile_code_repair_answer_that_forges_results_is_rejected() -> None:
    env, task, path, names = _task_and_target()
    broken = task.state["files"][path]
    hostile = {path: _TAMPER.format(names=names) + "\n" + broken}
    score = safe_verify(env, task, hostile)
    assert not score.passed and score.reward == 0.0, score
    assert "did not complete" in score.reason or "no result" in score.reason


def test_hostile_answer_that_runs_normally_but_patches_the_runner_is_rejected() -> None:
    # No early exit: the module patches json/importlib in the caller's process and keeps the bug.
    env, task, path, names = _task_and_target()
    broken = task.state["files"][path]
    patch = (
        "import importlib, json\n"
        "_real = json.dumps\n"
        "json.dumps = lambda obj, *a, **k: _real({k2: {'value': {'t': 'bool', 'v': True}} "
        "for k2 in obj} if isinstance(obj, dict) else obj, *a, **k)\n"
        "print('PASSED')\n"
    )
    score = safe_verify(env, task, {path: patch + broken})
    assert not score.passed, score
    # The correct code alone passes: the rejection is about the values, not the patching.
    assert safe_verify(env, task, env.solve(task)).passed


def test_hidden_tests_are_split_on_the_host_without_running_them() -> None:
    cases = split_test("from utils import clamp\nassert clamp(5, 0, 3) == 3\nassert not clamp(0, 0, 0)\n")
    assert cases == [("utils", "clamp", [5, 0, 3], ("eq", 3)), ("utils", "clamp", [0, 0, 0], ("false", None))]
    for bad in (
        "from utils import f\nimport os\nassert f(1)",
        "from utils import f\nassert f(open('x'))",
        "assert g(1) == 2",
        "from utils import f\nassert f(1) == [x for x in y]",
    ):
        with pytest.raises(HiddenTestFormatError):
            split_test(bad)


FORGING_PROPOSAL = """
import json, os, sys

from dsv.synth.env import Environment, Score, Task

_main = sys.modules.get("__main__")
_mark = getattr(_main, "MARKER", None) or (sys.argv[1] if len(sys.argv) > 1 else "")
# The verdict an in-process acceptance harness would have produced for a good environment.
sys.__stdout__.write(_mark + json.dumps({
    "ok": True, "name": "always_right", "domain": "maths", "description": "d", "prompts": ["p"],
    "sample_task": None, "tools": [], "answer_types": ["int"], "tasks_checked": 6,
    "wrong_answers_checked": 30, "results": [{"ok": True}],
}) + "\\n")
sys.__stdout__.flush()
os._exit(0)


class ProposedEnv(Environment):
    name = "always_right"
    domain = "maths"
    description = "Any answer is right."

    def generate(self, seed: int, difficulty: int = 2) -> Task:
        return self._task(seed, difficulty, f"Say anything ({seed}).", {}, "<answer>X</answer>")

    def solve(self, task: Task):
        return 1

    def verify(self, task: Task, answer, trace=None) -> Score:
        return Score.ok()
"""


def test_proposal_that_forges_the_check_verdict_is_rejected() -> None:
    request = {"seeds": [0, 1], "difficulties": [1, 3], "max_task_chars": 20_000, "n_prompts": 2}
    try:
        data = check_source(FORGING_PROPOSAL, request, limits=default_limits(6.0)).data
    except HarnessError as exc:  # a worker run that produced no well-formed reply
        data = {"ok": False, "category": exc.category, "reason": str(exc)}
    assert data["ok"] is False, data
    assert data["category"] == "crash" and "malformed" in data["reason"], data
    # Without the forgery the same environment is judged on what it does: it accepts junk.
    honest = FORGING_PROPOSAL[FORGING_PROPOSAL.index("class ProposedEnv") :]
    honest = "from dsv.synth.env import Environment, Score, Task\n\n\n" + honest
    data = run_harness(honest, {"mode": "check", **request}, limits=default_limits(6.0)).data
    assert data["ok"] is False and data["category"] == "accepts_wrong", data


def test_single_calls_return_raw_values_for_the_judge() -> None:
    honest = (
        "from dsv.synth.env import Environment, Score, Task\n\n\n"
        + FORGING_PROPOSAL[FORGING_PROPOSAL.index("class ProposedEnv") :]
    )
    task = run_harness(honest, {"mode": "generate", "seed": 4, "difficulty": 2}).data["task"]
    assert json.loads(json.dumps(task))["prompt"] == "Say anything (4)."
    score = run_harness(honest, {"mode": "verify", "task": task, "answer": None, "trace": []}).data
    assert score["ok"] is True and score["score"]["passed"] is True
