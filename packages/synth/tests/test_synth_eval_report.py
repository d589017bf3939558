"""The eval report when one folder holds both thinking modes, and failure reasons grouped by kind.

Run: ``pytest packages/synth/tests/test_synth_eval_report.py``.
"""

from __future__ import annotations

from typing import Any

from dsv.synth.eval.report import build_report, group_reasons, render_markdown


def _record(i: int, thinking: bool, passed: bool, reason: str) -> dict[str, Any]:
    return {"key": f"t{i}|0|{'thinking' if thinking else 'no-thinking'}", "task_id": f"t{i}", "family": "kb_qa",
            "sample": 0, "thinking": thinking, "status": "done", "passed": passed, "reward": float(passed),
            "reason": reason, "output_tokens": 10, "reasoning_tokens": 0, "reasoning_source": "none",
            "tool_calls": 0, "turns": 1}  # fmt: skip


def test_both_modes_are_named_and_the_last_run_kept_apart() -> None:
    records = [_record(i, thinking, i % 2 == 0, f"'name{i}' is not the answer") for i in range(12)
               for thinking in (True, False)]  # fmt: skip
    meta = {"target": "endpoint", "thinking": False, "episodes_wanted": 12, "episodes_reported": 24}
    report = build_report(records, meta)
    m = report["meta"]
    assert "thinking" not in m and m["last_run"] == {"thinking": False, "episodes_wanted": 12}
    assert m["modes"] == ["no-thinking", "thinking"]
    assert m["episodes_per_mode"] == {"no-thinking": 12, "thinking": 12} and m["episodes_reported"] == 24
    md = render_markdown(report)
    assert "- modes: `['no-thinking', 'thinking']`" in md
    # six distinct wrong names are one kind of failure, per mode
    assert md.count("- 6 × … is not the answer") == 2 and "name1" not in md


def test_group_reasons_keeps_singletons_whole_and_caps_the_list() -> None:
    reasons = {"'Alice' is not the answer": 3, "'Bob' is not the answer": 2, "expected 12, got 13": 1,
               "no answer found": 4}  # fmt: skip
    assert group_reasons(reasons) == [("… is not the answer", 5), ("no answer found", 4), ("expected 12, got 13", 1)]
    many = {f"kind {chr(97 + i)} failed": 1 for i in range(20)}
    rows = group_reasons(many, limit=5)
    assert len(rows) == 5 and rows[-1] == ("16 other kinds of failure", 16)
