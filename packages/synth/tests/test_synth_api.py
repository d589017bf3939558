"""Public API, tool schemas, task files, episodes, bad input, the reasoning_gym adapter and the CLI.

Run: pytest packages/synth/tests/test_synth_api.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Literal

import pytest
from typer.testing import CliRunner

import dsv.synth as synth
from dsv.synth import Score, Task, registry, safe_verify
from dsv.synth.cli import synth_app
from dsv.synth.episode import run_episode
from dsv.synth.tasks import TaskFileError, read_tasks, read_tasks_report, write_tasks
from dsv.synth.tools import call_tool, tool_schema


def test_public_api_is_pinned() -> None:
    assert set(synth.__all__) == {
        "DEFAULT_DIFFICULTY", "AnswerFormatError", "Environment", "EpisodeResult", "Limits", "SandboxResult",
        "Score", "Task", "TaskFileError", "TaskFormatError", "ToolCallRecord", "UnknownFamilyError", "call_tool",
        "families", "get", "read_tasks", "register", "run_command", "run_episode", "run_python", "safe_verify",
        "tool_schema", "write_tasks",
    }  # fmt: skip


def test_import_does_not_pull_torch() -> None:
    code = "import sys, dsv.synth, dsv.synth.registry as r; r.families(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def book(city: str, nights: int, mode: Literal["fast", "cheap"] = "cheap", note: str | None = None) -> str:
    """Book a room.

    Args:
        city: where to stay.
        nights: how many nights,
            at least one.
        mode: booking mode.
        note: free text.
    """
    return f"{city}:{nights}:{mode}"


def test_tool_schema_from_hints_and_docstring() -> None:
    fn = tool_schema(book)["function"]
    assert fn["name"] == "book" and fn["description"] == "Book a room."
    props = fn["parameters"]["properties"]
    assert props["city"] == {"type": "string", "description": "where to stay."}
    assert props["nights"]["type"] == "integer"
    assert props["nights"]["description"] == "how many nights, at least one."
    assert props["mode"]["enum"] == ["fast", "cheap"] and props["mode"]["default"] == "cheap"
    assert props["note"]["type"] == ["string", "null"]
    assert fn["parameters"]["required"] == ["city", "nights"]


def test_call_tool_validates_and_never_raises() -> None:
    assert call_tool([book], "book", {"city": "Oslo", "nights": 2}) == "Oslo:2:cheap"
    assert call_tool([book], "book", '{"city": "Oslo", "nights": "3"}') == "Oslo:3:cheap"  # exact coercion
    assert call_tool([book], "nope", {}).startswith("error: unknown tool")
    assert "missing required" in call_tool([book], "book", {"city": "Oslo"})
    assert "expected integer" in call_tool([book], "book", {"city": "Oslo", "nights": "two"})
    assert "must be one of" in call_tool([book], "book", {"city": "x", "nights": 1, "mode": "slow"})
    assert "unknown argument" in call_tool([book], "book", {"city": "x", "nights": 1, "extra": 1})
    assert "not valid JSON" in call_tool([book], "book", "{oops")

    def broken() -> str:
        """Always fails."""
        raise RuntimeError("disk on fire")

    assert call_tool([broken], "broken", {}) == "error: broken failed: RuntimeError: disk on fire"


def test_task_files_roundtrip_and_report_file_line(tmp_path) -> None:
    tasks = [registry.get("arithmetic").generate(s) for s in range(3)]
    path = tmp_path / "t.jsonl"
    assert write_tasks(path, tasks) == 3
    assert read_tasks(path) == tasks
    lines = path.read_text().splitlines()
    bad = json.loads(lines[1])
    del bad["prompt"]
    path.write_text("\n".join([lines[0], json.dumps(bad), "{not json", lines[2]]) + "\n")
    with pytest.raises(TaskFileError, match=r"t\.jsonl:2: missing field 'prompt'"):
        read_tasks(path)
    kept, errors = read_tasks_report(path, on_bad_record="skip")
    assert [t.id for t in kept] == [tasks[0].id, tasks[2].id]
    assert len(errors) == 2 and ":3: invalid JSON" in errors[1]
    wrong_type = dict(json.loads(lines[0]), seed="zero")
    path.write_text(json.dumps(wrong_type) + "\n")
    with pytest.raises(TaskFileError, match="field 'seed' must be int"):
        read_tasks(path)
    with pytest.raises(TaskFileError, match="no such task file"):
        read_tasks(tmp_path / "missing.jsonl")


def test_unknown_family_lists_close_matches() -> None:
    with pytest.raises(registry.UnknownFamilyError) as err:
        registry.get("sudoko")
    assert "sudoku" in str(err.value)


def test_wrong_types_and_raising_verifiers_are_scored_failures() -> None:
    for name in registry.families():
        env = registry.get(name)
        task = env.generate(0)
        for junk in (None, 3.5, {"x": [1]}, ["a", None], "\x00"):
            s = safe_verify(env, task, junk)
            assert isinstance(s, Score) and not s.passed and s.reason, (name, junk)

    class Exploding(registry.families()["arithmetic"]):  # type: ignore[misc, valid-type]
        def verify(self, task, answer, trace=None):
            raise KeyError("state corrupt")

    s = safe_verify(Exploding(), registry.get("arithmetic").generate(0), 1)
    assert s == Score(0.0, False, "verifier raised KeyError: 'state corrupt'")


def _scripted_policy(env, task):
    """Call every tool once with plausible arguments, then answer with the reference solution."""
    steps = iter(range(100))

    def policy(messages: list[dict], tools: list[dict]) -> dict:
        i = next(steps)
        if i == 0 and tools:
            calls = []
            for k, t in enumerate(tools):
                props = t["function"]["parameters"]["properties"]
                args = {p: ("x" if s.get("type") == "string" else 1) for p, s in props.items()}
                calls.append(
                    {
                        "id": f"c{k}",
                        "type": "function",
                        "function": {"name": t["function"]["name"], "arguments": json.dumps(args)},
                    }
                )
            return {"role": "assistant", "content": "", "tool_calls": calls}
        return {"role": "assistant", "content": f"Answer: {json.dumps(env.solve(task))}"}

    return policy


@pytest.mark.parametrize(
    "family", ["travel", "sql", "kb_qa", "meeting", "shortest_path", "code_repair", "sudoku"]
)
def test_episode_with_tools_and_final_answer(family: str) -> None:
    env = registry.get(family)
    task = env.generate(1)
    result = run_episode(env, task, _scripted_policy(env, task))
    if task.tools:
        assert result.tool_calls == len(task.tools) and len(result.trace) == len(task.tools)
        assert [m["role"] for m in result.messages[:2]] == ["user", "assistant"]
        assert all(m["role"] == "tool" for m in result.messages[2 : 2 + len(task.tools)])
    assert result.score.passed and result.score.reward == 1.0, result.score
    assert result.turns == (2 if task.tools else 1)


def test_episode_failures_are_scored() -> None:
    env = registry.get("arithmetic")
    task = env.generate(0)
    r = run_episode(env, task, lambda m, t: {"role": "assistant", "content": "   "})
    assert not r.score.passed and "unparseable" in r.score.reason
    r = run_episode(env, task, lambda m, t: (_ for _ in ()).throw(ConnectionError("endpoint down")))
    assert not r.score.passed and "ConnectionError" in r.score.reason
    loop = {"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {"name": "x"}}]}
    r = run_episode(env, task, lambda m, t: loop, max_turns=3)
    assert not r.score.passed and "within 3 turns" in r.score.reason
    assert r.trace[0].result.startswith("error: unknown tool")


def test_parse_answer_forms() -> None:
    env = registry.get("knights_knaves")
    assert env.parse_answer('reasoning</think>blah\nAnswer: {"A": "knight"}') == {"A": "knight"}
    assert env.parse_answer("x\n```json\n[1, 2]\n```\n") == [1, 2]
    assert env.parse_answer("<answer>42</answer> trailing") == 42
    with pytest.raises(synth.AnswerFormatError):
        env.parse_answer("   \n  ")
    # Without a marker the last non-empty line; only the text after the last </think> counts.
    assert env.parse_answer("first\nsecond\n\n7\n  ") == 7
    assert env.parse_answer("plan</think>draft: 3</think>\nAnswer: 5") == 5


def test_sudoku_verifier_scores_each_kind_of_wrong_grid() -> None:
    """Every way a grid can be wrong is a failed score naming it, never an exception: too few digits,
    not a grid at all, a changed given, a repeated digit; the solution as text or rows passes."""
    env = registry.get("sudoku")
    task = env.generate(3)
    size = task.state["size"]
    solution = [int(d) for d in env.solve(task).split()]
    rows = [solution[r * size : (r + 1) * size] for r in range(size)]
    assert env.verify(task, env.solve(task)).passed and env.verify(task, rows).passed
    short = env.verify(task, env.solve(task)[:-2])
    assert not short.passed and f"expected {size * size} digits" in short.reason
    assert not env.verify(task, 3.5).passed
    given = next(i for i, v in enumerate(task.state["puzzle"]) if v)
    changed = list(solution)
    changed[given] = changed[given] % size + 1
    assert "changes the given digit" in env.verify(task, changed).reason
    free = next(i for i, v in enumerate(task.state["puzzle"]) if not v)
    clash = list(solution)
    clash[free] = clash[free] % size + 1
    bad = env.verify(task, clash)
    assert not bad.passed and "does not hold each digit once" in bad.reason, bad


def test_sudoku_verifier_names_the_first_broken_row_column_box_or_given() -> None:
    """On a 4x4 task with no givens (then one), hand-made grids that break exactly one rule: the
    reason names that rule and its place, so a check skipped or pointed at the wrong cells shows."""
    import dataclasses

    env = registry.get("sudoku")
    base = env.generate(0, 1)
    assert base.state["size"] == 4 and base.state["box"] == [2, 2]
    empty = dataclasses.replace(base, state={**base.state, "puzzle": [0] * 16})

    def grid(*rows: str) -> str:
        return "\n".join(" ".join(r) for r in rows)

    assert env.verify(empty, grid("1234", "3412", "2143", "4321")).passed
    # Rows and columns hold each digit once, the top-left box does not (a cyclic Latin square).
    assert env.verify(empty, grid("1234", "2341", "3412", "4123")).reason == (
        "box at row 1, column 1 does not hold each digit once"
    )
    # Rows and boxes fine, columns 3 and 4 not (the last row's two right cells swapped).
    assert env.verify(empty, grid("1234", "3412", "2143", "4312")).reason == (
        "column 3 does not hold each digit once"
    )
    assert env.verify(empty, grid("1231", "3412", "2143", "4324")).reason == "row 1 does not hold each digit once"
    assert env.verify(empty, "1 2 3 4").reason == "expected 16 digits, got 4"
    given = dataclasses.replace(base, state={**base.state, "puzzle": [0] * 6 + [2] + [0] * 9})
    assert env.verify(given, grid("1234", "3412", "2143", "4321")).reason == (
        "changes the given digit at row 2, column 3"
    )
    # A fenced grid is read from its block; plain text is taken whole.
    fenced = "my grid:\n```\n" + grid("1234", "3412", "2143", "4321") + "\n```\nthanks 5"
    assert env.parse_answer(fenced) == grid("1234", "3412", "2143", "4321")
    assert env.parse_answer("1 2\n3 4") == "1 2\n3 4"


def test_task_from_json_names_bad_field() -> None:
    good = registry.get("arithmetic").generate(0).to_json()
    with pytest.raises(synth.TaskFormatError, match="'tools'"):
        Task.from_json({**good, "tools": [1]})
    with pytest.raises(synth.TaskFormatError, match="'difficulty'"):
        Task.from_json({**good, "difficulty": True})


def test_reasoning_gym_adapter() -> None:
    pytest.importorskip("reasoning_gym")
    env = registry.get("rg:basic_arithmetic")
    task = env.generate(5)
    assert task.family == "rg:basic_arithmetic" and task.id == "rg:basic_arithmetic-2-5"
    assert safe_verify(env, task, env.solve(task)).passed
    assert not safe_verify(env, task, env.solve(task) + "1").passed
    assert env.parse_answer("so <answer> 7 </answer>") == "7"


runner = CliRunner()


def test_cli_generate_list_show(tmp_path) -> None:
    out = tmp_path / "tasks.jsonl"
    r = runner.invoke(
        synth_app, ["generate", "arithmetic", "sql", "--n", "3", "--seed", "5", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    tasks = read_tasks(out)
    assert [t.id for t in tasks][:2] == ["arithmetic-2-5", "arithmetic-2-6"] and len(tasks) == 6
    r = runner.invoke(synth_app, ["list"])
    assert r.exit_code == 0 and "travel" in r.output and "code_repair" in r.output
    r = runner.invoke(synth_app, ["show", "shortest_path"])
    assert r.exit_code == 0 and '"neighbours"' in r.output and "reference" in r.output


def test_cli_user_errors_are_one_line(tmp_path) -> None:
    r = runner.invoke(synth_app, ["generate", "arithmetik", "--out", str(tmp_path / "x.jsonl")])
    assert r.exit_code == 1 and "did you mean arithmetic" in r.output and "Traceback" not in r.output
    r = runner.invoke(
        synth_app, ["generate", "sudoku", "--difficulty", "9", "--out", str(tmp_path / "x.jsonl")]
    )
    assert r.exit_code == 1 and "1..5" in r.output
    r = runner.invoke(synth_app, ["generate", "sudoku", "--format", "csv", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2
    r = runner.invoke(synth_app, ["show", "trave"])
    assert r.exit_code == 1 and "travel" in r.output


def test_cli_generate_hf(tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "ds"
    r = runner.invoke(synth_app, ["generate", "zebra", "--n", "4", "--format", "hf", "--out", str(out)])
    assert r.exit_code == 0, r.output
    ds = datasets.load_from_disk(str(out))
    assert len(ds) == 4 and ds[0]["id"] == "zebra-2-0"
    assert Task.from_json({**ds[0], "tools": json.loads(ds[0]["tools"]), "state": json.loads(ds[0]["state"])})
