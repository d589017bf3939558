"""Rewards and prompt sources: user callables from files (sync, async), weights, and the failures a
run must survive (raise, hang, NaN) or refuse up front (bad file, unknown family)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from dsv.rl.data import DataError, TaskSource
from dsv.rl.rewards import RewardError, RewardInput, RewardSet, load_reward
from dsv.synth import registry
from dsv.synth.env import Score


def _input(completion: str = "Answer: 4", passed: bool = True, finish: str = "stop") -> RewardInput:
    task = registry.get("arithmetic").generate(0, 1)
    score = Score.ok() if passed else Score.fail("wrong value 3")
    return RewardInput(prompt=task.prompt, completion=completion, message={"role": "assistant", "content": completion},
                       task=task.to_json(), score=score, finish_reason=finish, completion_tokens=10, max_tokens=16)  # fmt: skip


def test_builtin_terms_and_weights() -> None:
    rs = RewardSet.from_specs(["verifier", "format=0.5", "length=0.25"])
    r = rs.score(_input())
    assert r.terms == {"verifier": 1.0, "format": 1.0, "length": pytest.approx(-0.25)}
    assert r.total == pytest.approx(1.0 + 0.5 - 0.0625)
    cut = rs.score(_input(passed=False, finish="length"))
    assert cut.terms == {"verifier": 0.0, "format": 0.0, "length": -1.0}
    assert not r.errors and not cut.errors


def test_user_rewards_sync_async_and_their_arguments(tmp_path: Path) -> None:
    f = tmp_path / "my_reward.py"
    f.write_text(
        "import asyncio\n"
        "def short(completion, metadata):\n"
        "    return 1.0 if len(completion) < 20 and metadata['family'] == 'arithmetic' else 0.0\n"
        "async def later(prompt, message, task, **kw):\n"
        "    await asyncio.sleep(0)\n"
        "    return 0.5 if message['content'] and task['family'] and kw['score'].passed else 0.0\n"
    )
    rs = RewardSet.from_specs([f"{f}:short=2", f"{f}:later"])
    r = rs.score(_input())
    assert r.terms == {"my_reward:short": 1.0, "my_reward:later": 0.5} and r.total == 2.5 and not r.errors


def test_a_failing_reward_scores_zero_with_a_reason(tmp_path: Path) -> None:
    f = tmp_path / "bad.py"
    f.write_text(
        "import time\n"
        "def boom(**_): raise RuntimeError('no')\n"
        "def nan(**_): return float('nan')\n"
        "def text(**_): return 'yes'\n"
        "def hang(**_):\n    time.sleep(5)\n    return 1.0\n"
    )
    rs = RewardSet.from_specs(["verifier", f"{f}:boom", f"{f}:nan", f"{f}:text", f"{f}:hang"], timeout=0.3)
    t0 = time.perf_counter()
    r = rs.score(_input())
    assert time.perf_counter() - t0 < 3
    assert r.total == 1.0 and math.isfinite(r.total)
    joined = "\n".join(r.errors)
    for why in ("bad:boom: raised RuntimeError: no", "bad:nan: returned nan", "bad:text: returned str", "bad:hang: timed out"):
        assert why in joined, joined
    again = rs.score(_input())  # the pool still works after a hung call
    assert again.terms["verifier"] == 1.0
    rs.close()


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("missing.py:fn", "no file"),
        ("{dir}/broken.py:fn", "does not import: SyntaxError"),
        ("{dir}/ok.py:nope", "has no function 'nope' (it defines: fine)"),
        ("verifier=heavy", "must be a number"),
        ("nonsense", "expected one of verifier, format, length"),
    ],
)
def test_bad_reward_specs_are_refused(tmp_path: Path, spec: str, why: str) -> None:
    (tmp_path / "broken.py").write_text("def fn(:\n")
    (tmp_path / "ok.py").write_text("def fine(**_):\n    return 1.0\n")
    with pytest.raises(RewardError, match=None) as info:
        load_reward(spec.format(dir=tmp_path))
    assert why in str(info.value)


def test_task_source_is_deterministic_and_held_out_is_disjoint(tmp_path: Path) -> None:
    from dsv.synth.tasks import write_tasks

    file = tmp_path / "tasks.jsonl"
    env = registry.get("combinatorics")
    write_tasks(file, [env.generate(s, 1) for s in range(20)])
    a = TaskSource(["arithmetic", str(file)], seed=3, holdout=5)
    b = TaskSource(["arithmetic", str(file)], seed=3, holdout=5)
    assert [t.id for t in a.batch(7, 4)] == [t.id for t in b.batch(7, 4)]
    assert [t.family for t in a.batch(0, 4)] == ["arithmetic", "combinatorics"] * 2
    train_ids = {t.id for s in range(40) for t in a.batch(s, 4)}
    held = {t.id for t in a.held_out(10)}
    assert len(held) == 10 and not train_ids & held


def test_unknown_family_suggests_close_names() -> None:
    with pytest.raises(DataError, match="did you mean arithmetic"):
        TaskSource(["arithmetc"])
