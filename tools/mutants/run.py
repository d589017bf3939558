"""Mutation testing of the modules whose bugs the tests must catch: sampling, answer verification and
the DSA attention references. Each target names functions of one module and the tests that should
notice when one of them breaks; cosmic-ray (PyPI) mutates those functions one change at a time and runs
the tests on each mutant. Survivors are written to ``tools/mutants/REPORT.md``.

The mutants live in a copy of the committed tree (``git archive HEAD``) put first on ``PYTHONPATH``, so
the working tree is never modified and the run works whether dsv is installed editable or not. One
mutant per operator family and source line is kept (``a < b`` becomes one other comparison, not each
of ``a == b``, ``a > b``, ...), which keeps a run to minutes per target.

Run: ``nox -s mutants`` (every target), or ``python tools/mutants/run.py --target sampling`` with
cosmic-ray installed.
"""

from __future__ import annotations

import argparse
import ast
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "tools" / "mutants" / "REPORT.md"
SRC_DIRS = ["apps/cli/src", "packages/core/src", "kernels/src", "packages/synth/src", "packages/serve/src",
            "packages/train/src"]  # fmt: skip


@dataclass(frozen=True)
class Target:
    name: str
    module: str  # path from the repository root
    functions: tuple[str, ...]  # top-level functions or Class.method
    tests: tuple[str, ...]  # pytest arguments


TARGETS = [
    Target(
        "sampling",
        "packages/core/src/dsv/core/generate.py",
        ("scaled_logits", "kept_token_mask", "apply_penalties", "apply_logit_bias", "sample_next"),
        ("packages/core/tests/test_core_generate.py",),
    ),
    Target(
        "verifier",
        "packages/synth/src/dsv/synth/families/logic.py",
        ("SudokuEnv.parse_answer", "SudokuEnv._grid", "SudokuEnv.verify"),
        ("packages/synth/tests/test_synth_api.py", "packages/synth/tests/test_synth_families.py", "-k", "sudoku"),
    ),
    Target(
        "answer-extraction",
        "packages/synth/src/dsv/synth/env.py",
        ("extract_answer_text", "parse_json_or_text"),
        ("packages/synth/tests/test_synth_api.py",),
    ),
    Target(
        "attention-reference",
        "packages/core/src/dsv/core/attention.py",
        ("causal_key_mask", "indexer_scores_reference", "attention_probs_summed_reference",
         "indexer_kl_loss_reference"),
        ("packages/core/tests/test_core_attention.py",),
    ),
]  # fmt: skip


def _line_ranges(path: Path, functions: tuple[str, ...]) -> list[tuple[int, int]]:
    """(first, last) source lines of each named function, decorators and docstring included."""
    tree = ast.parse(path.read_text())
    found: dict[str, tuple[int, int]] = {}
    for node in tree.body:
        defs = [(node.name, node)] if isinstance(node, ast.FunctionDef) else []
        if isinstance(node, ast.ClassDef):
            defs = [(f"{node.name}.{f.name}", f) for f in node.body if isinstance(f, ast.FunctionDef)]
        for name, fn in defs:
            first = min([fn.lineno, *(d.lineno for d in fn.decorator_list)])
            found[name] = (first, fn.end_lineno or fn.lineno)
    missing = [f for f in functions if f not in found]
    assert not missing, f"{path}: no function {missing}"
    return [found[f] for f in functions]


def _copy_tree(dest: Path) -> str:
    """The committed tree (HEAD) into ``dest``; returns its commit."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return commit


def _run_target(target: Target, work: Path, python: str, timeout_s: float) -> dict:
    from cosmic_ray.work_db import WorkDB, use_db
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome, WorkResult

    tests = " ".join(target.tests)
    # The copy's sources first: the tests import the mutated modules whatever is installed.
    src = os.pathsep.join(str(work / d) for d in SRC_DIRS)
    config = work / f"{target.name}.toml"
    config.write_text(
        "[cosmic-ray]\n"
        f'module-path = "{target.module}"\n'
        f"timeout = {timeout_s}\n"
        "excluded-modules = []\n"
        f'test-command = "env PYTHONPATH={src} OMP_NUM_THREADS=1 {python} -m pytest -x -q -p no:cacheprovider {tests}"\n'
        "\n[cosmic-ray.distributor]\nname = \"local\"\n"
    )
    session = work / f"{target.name}.sqlite"
    cr = [sys.executable, "-m", "cosmic_ray.cli"]
    subprocess.run([*cr, "init", str(config), str(session)], cwd=work, check=True)
    ranges = _line_ranges(work / target.module, target.functions)
    seen: set[tuple[str, int]] = set()
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item in list(db.work_items):
            m = item.mutations[0]
            family = m.operator_name.split("/")[-1].split("_")[0]
            inside = any(a <= m.start_pos[0] <= b for a, b in ranges)
            if not inside or (family, m.start_pos[0]) in seen:
                db.set_result(item.job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED))
            else:
                seen.add((family, m.start_pos[0]))
    start = time.monotonic()
    subprocess.run([*cr, "exec", str(config), str(session)], cwd=work, check=True)
    seconds = time.monotonic() - start
    counts = {"killed": 0, "survived": 0, "incompetent": 0}
    survivors: list[tuple[int, str, str]] = []
    with use_db(str(session), WorkDB.Mode.open) as db:
        for item, result in db.completed_work_items:
            if result.worker_outcome == WorkerOutcome.SKIPPED:
                continue
            if result.test_outcome == TestOutcome.SURVIVED:
                counts["survived"] += 1
                m = item.mutations[0]
                survivors.append((m.start_pos[0], m.operator_name, result.diff or ""))
            elif result.test_outcome == TestOutcome.KILLED:
                counts["killed"] += 1
            else:
                counts["incompetent"] += 1
    return {"target": target, "counts": counts, "survivors": sorted(survivors), "seconds": seconds}


def _diff_body(diff: str) -> str:
    return "\n".join(line for line in diff.splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---"))


def _write_report(results: list[dict], path: Path, commit: str) -> None:
    lines = [
        "# Surviving mutants",
        "",
        "Written by `tools/mutants/run.py` (`nox -s mutants`): cosmic-ray mutants of the functions below,",
        "one per operator family and source line, each run against the listed tests. A survivor is a",
        "change no listed test notices: a missing test, or a change that does not alter behaviour (an",
        "equivalent mutant; say so here when one is judged to be).",
        "",
        f"Commit: `{commit}`",
        "",
        "| target | module | killed | survived | incompetent | minutes |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        c, t = r["counts"], r["target"]
        lines.append(f"| {t.name} | `{t.module}` | {c['killed']} | {c['survived']} | {c['incompetent']} | "
                     f"{r['seconds'] / 60:.1f} |")  # fmt: skip
    for r in results:
        t = r["target"]
        lines += ["", f"## {t.name}", "", f"Functions: {', '.join(f'`{f}`' for f in t.functions)}.",
                  f"Tests: `{' '.join(t.tests)}`.", ""]  # fmt: skip
        if not r["survivors"]:
            lines.append("No survivor.")
        for line_no, op, diff in r["survivors"]:
            lines += [f"- line {line_no}, `{op}`:", "", "  ```diff",
                      *(f"  {x}" for x in _diff_body(diff).splitlines()), "  ```"]  # fmt: skip
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", action="append", choices=[t.name for t in TARGETS],
                        help="run only these targets (default: all)")  # fmt: skip
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs the tests")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per mutant's test run")
    parser.add_argument("--jobs", type=int, default=1, help="targets run side by side")
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args()
    chosen = [t for t in TARGETS if not args.target or t.name in args.target]
    with tempfile.TemporaryDirectory(prefix="dsv-mutants-") as tmp:
        work = Path(tmp)
        commit = _copy_tree(work)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(lambda t: _run_target(t, work, args.python, args.timeout), chosen))
    _write_report(results, args.report, commit)
    for r in results:
        print(r["target"].name, r["counts"])


if __name__ == "__main__":
    main()
