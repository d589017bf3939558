"""End to end across distributions: synth tasks -> training on them -> generation -> eval, and a
checkpoint served over HTTP scored by `dsv eval` through the OpenAI API.

The model is a tiny random/briefly trained one, so accuracy is not asserted to be high: what is
checked is that every stage consumes the previous stage's real output and reports well-formed results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from dsv_e2e import reserved_port, run_dsv

pytestmark = pytest.mark.slow


def test_synth_to_train_to_eval(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.jsonl"
    run_dsv("synth", "generate", "arithmetic", "meeting", "--n", "4", "--seed", "0", "--out", str(tasks))
    lines = tasks.read_text().splitlines()
    assert len(lines) == 8 and all(json.loads(line)["prompt"] for line in lines)

    run_dsv("train", "pretrain", "--out", str(tmp_path / "pre"), "--model", "tiny", "--data", str(tasks),
            "--steps", "4", "--micro-batch-size", "2", "--seq-len", "64")  # fmt: skip
    final = tmp_path / "pre" / "final"
    assert (final / "config.json").exists() and (final / "tokenizer.json").exists()
    metrics = [
        json.loads(x) for x in (tmp_path / "pre" / "metrics.jsonl").read_text().splitlines() if x.strip()
    ]
    # Four steps of a fresh tiny model on the task text: each logged, each loss finite and near ln(1024).
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4]
    assert all(3.0 < m["loss"] < 9.0 for m in metrics if "loss" in m), metrics

    r = run_dsv("generate", str(final), "--prompt", "2 + 2 =", "--max-new-tokens", "4", "--seed", "0")
    assert "4 tokens" in r.stderr or "finish_reason=stop" in r.stderr

    out = tmp_path / "eval"
    run_dsv(
        "eval",
        "--model",
        str(final),
        "--tasks",
        str(tasks),
        "--max-tokens",
        "8",
        "--no-thinking",
        "--out",
        str(out),
    )
    _check_report(out, {"arithmetic": 4, "meeting": 4}, max_tokens=8)
    assert "## no-thinking" in (out / "report.md").read_text()


def _check_report(out: Path, families: dict[str, int], max_tokens: int) -> list[dict]:
    """The eval's results.jsonl and report.json agree: one finished episode per task (no endpoint
    error), each within the token limit, and the report's accuracy and counts are those of the file."""
    results = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()]
    assert sorted(r["family"] for r in results) == sorted(f for f, n in families.items() for _ in range(n))
    assert all(r["status"] == "done" and 0 <= r["output_tokens"] <= max_tokens for r in results), results
    block = json.loads((out / "report.json").read_text())["results"]["no-thinking"]
    overall = block["overall"]
    assert overall["episodes"] == overall["tasks"] == len(results) and overall["errors"] == 0
    assert overall["accuracy"] == sum(r["passed"] for r in results) / len(results)
    assert {f: v["episodes"] for f, v in block["families"].items()} == families
    return results


def test_served_checkpoint_scored_through_openai_api(tiny_ckpt: Path, tmp_path: Path) -> None:
    with reserved_port() as port:
        _served_checkpoint_scored(tiny_ckpt, tmp_path, port)


def _served_checkpoint_scored(tiny_ckpt: Path, tmp_path: Path, port: int) -> None:
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dsv.cli.main",
            "serve",
            str(tiny_ckpt),
            "--port",
            str(port),
            "--model-name",
            "tiny",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"dsv serve did not come up:\n{server.stdout.read() if server.stdout else ''}")
            time.sleep(0.5)
        out = tmp_path / "eval"
        run_dsv("eval", "--base-url", f"http://127.0.0.1:{port}/v1", "--model", "tiny", "--family", "arithmetic",
                "--n", "3", "--max-tokens", "8", "--concurrency", "3", "--no-thinking", "--out", str(out),
                env={"OPENAI_API_KEY": "unused"})  # fmt: skip
        results = _check_report(out, {"arithmetic": 3}, max_tokens=8)
        # The server counted exactly what the eval was given: three choices, the same output tokens.
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        samples = {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("dsv_") and not line.startswith("#")
        }
        finished = sum(v for k, v in samples.items() if k.startswith("dsv_finished_choices_total{"))
        assert finished == 3, samples
        assert samples["dsv_generated_tokens_total"] == sum(r["output_tokens"] for r in results)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
