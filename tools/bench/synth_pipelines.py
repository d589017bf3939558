"""Benchmark of the agentic data pipelines on their test inputs: throughput, acceptance, difficulty.

`dsv synth repo-envs` runs over the test suite's repositories (Python and JavaScript: a kept
fix, a flaky one, an untested one, a pull request) and `dsv synth search-qa` over its document
collection, both with the scripted agents of the tests on loopback, so the numbers measure
the pipelines (git, sandboxed installs and test runs, BM25, checks), not a model. Each run
starts from an empty output folder; the median of ``--repeats`` runs is reported.

Difficulty per family: the share of the kept tasks the reference answer solves, against a
trivial policy (repo_issue: submit the parent tree unchanged; search_qa: answer the title of
the top BM25 hit for the question).

Run: python tools/bench/synth_pipelines.py --repeats 3 [--markdown tools/bench/results/synth-pipelines.md]
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parents[2] / "packages" / "synth" / "tests"


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"dsv_bench_{name}", TESTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def bench_repo_envs(repeats: int) -> dict[str, Any]:
    from dsv.synth import registry
    from dsv.synth.eval.client import EndpointClient
    from dsv.synth.pipeline.repo_envs import RepoEnvsConfig, build_repo_envs, find_repositories
    from dsv.synth.tasks import read_tasks

    t = _load("test_synth_repo_envs")
    rates, accept, seconds, tasks = [], [], [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            t.make_repos(root)
            with t.se.ScriptedEndpoint(t.setup_agent) as endpoint:
                client = EndpointClient(endpoint.base_url, endpoint.model, max_retries=0)
                config = RepoEnvsConfig(out_dir=root / "out", issues=root / "issues.json", pulls=root / "pulls.json")
                report = build_repo_envs(client, config, find_repositories(root))
                client.close()
            runs = sum(c["sandbox_runs"] for c in report["candidates"])
            rates.append(report["envs_per_minute"])
            accept.append(report["acceptance_rate"])
            seconds.append(report["candidate_seconds"])
            tasks = read_tasks(root / "out" / "tasks.jsonl")
            env = registry.get("repo_issue")
            ref = sum(env.verify(task, env.solve(task)).passed for task in tasks)
            trivial = sum(env.verify(task, {}).passed for task in tasks)
    return {
        "candidates": report["counts"]["total"],
        "accepted": report["counts"]["accepted"],
        "by_category": report["by_category"],
        "envs_per_minute": statistics.median(rates),
        "acceptance_rate": statistics.median(accept),
        "seconds": statistics.median(seconds),
        "sandbox_runs": runs,
        "tasks": len(tasks),
        "reference_solved": ref,
        "trivial_solved": trivial,
    }


def bench_search_qa(repeats: int) -> dict[str, Any]:
    from dsv.synth import registry
    from dsv.synth.eval.client import EndpointClient
    from dsv.synth.pipeline.search_qa import SearchQaConfig, build_search_qa
    from dsv.synth.searchqa_env import index_for
    from dsv.synth.tasks import read_tasks

    t = _load("test_synth_searchqa")
    rates, accept = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            docs = t._write_docs(root / "docs")
            with t.se.ScriptedEndpoint(t.agents) as endpoint:
                client = EndpointClient(endpoint.base_url, endpoint.model, max_retries=0)
                start = datetime.now(UTC)
                report = build_search_qa(client, SearchQaConfig(out_dir=root / "out", corpus_dir=docs, n=6))
                spent = (datetime.now(UTC) - start).total_seconds()
                client.close()
            rates.append(60 * report["counts"]["total"] / spent)
            accept.append(report["acceptance_rate"])
            tasks = read_tasks(root / "out" / "tasks.jsonl")
            env = registry.get("search_qa")
            ref = sum(env.verify(task, env.solve(task)).passed for task in tasks)
            trivial = 0
            for task in tasks:
                hits = index_for(task.state["corpus"]).search(task.prompt, 1)
                trivial += bool(hits) and env.verify(task, hits[0].title).passed
    return {
        "items": report["counts"]["total"],
        "accepted": report["counts"]["accepted"],
        "by_category": report["by_category"],
        "items_per_minute": statistics.median(rates),
        "acceptance_rate": statistics.median(accept),
        "tasks": len(tasks),
        "reference_solved": ref,
        "trivial_solved": trivial,
    }


def markdown(repo: dict[str, Any], sqa: dict[str, Any], repeats: int) -> str:
    machine = f"{platform.machine()}, Python {platform.python_version()}, no GPU"
    date = datetime.now(UTC).date().isoformat()
    return "\n".join([
        "## dsv-synth: agentic data pipelines (repo-envs, search-qa)",
        "",
        f"Command: `python tools/bench/synth_pipelines.py --repeats {repeats}`  ",
        f"Machine: 2-core CPU shared with other jobs ({machine}); date {date}.  ",
        "Inputs: the test suite's repositories and document collection, with its scripted agents on loopback "
        "(the numbers measure the pipelines, not a model); median of the runs.",
        "",
        "| pipeline | candidates | accepted | acceptance rate | throughput | reasons |",
        "|---|---:|---:|---:|---|---|",
        f"| repo-envs | {repo['candidates']} | {repo['accepted']} | {repo['acceptance_rate']:.2f} | "
        f"{repo['envs_per_minute']:.1f} environments/min ({repo['seconds']:.1f} s of candidate work) | "
        f"{', '.join(f'{k} {v}' for k, v in repo['by_category'].items())} |",
        f"| search-qa | {sqa['items']} | {sqa['accepted']} | {sqa['acceptance_rate']:.2f} | "
        f"{sqa['items_per_minute']:.1f} items judged/min | "
        f"{', '.join(f'{k} {v}' for k, v in sqa['by_category'].items())} |",
        "",
        "Difficulty of the kept tasks (share solved):",
        "",
        "| family | tasks | reference | trivial policy |",
        "|---|---:|---:|---|",
        f"| repo_issue | {repo['tasks']} | {repo['reference_solved']}/{repo['tasks']} | "
        f"{repo['trivial_solved']}/{repo['tasks']} (submit the parent tree unchanged) |",
        f"| search_qa | {sqa['tasks']} | {sqa['reference_solved']}/{sqa['tasks']} | "
        f"{sqa['trivial_solved']}/{sqa['tasks']} (title of the top BM25 hit) |",
        "",
        f"repo-envs made {repo['sandbox_runs']} sandboxed suite runs (setup attempts, 3 reruns on each side of "
        f"each fix, 2 verifier checks per kept environment): {repo['seconds'] / repo['sandbox_runs']:.2f} s per "
        "run on average, which is where the time goes.",
        "",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", type=Path, default=None, help="also write the section to this file")
    args = parser.parse_args()
    repo = bench_repo_envs(args.repeats)
    sqa = bench_search_qa(args.repeats)
    text = markdown(repo, sqa, args.repeats)
    print(text)
    if args.markdown is not None:
        from dsv.synth.eval._io import atomic_write_text

        atomic_write_text(args.markdown, text)


if __name__ == "__main__":
    main()
