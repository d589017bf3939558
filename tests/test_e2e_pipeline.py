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
from dsv_e2e import free_port, run_dsv

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
    assert any("loss" in m for m in metrics)

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
    report = json.loads((out / "report.json").read_text())
    assert json.dumps(report).count("accuracy") >= 1
    assert (out / "report.md").exists()


def test_served_checkpoint_scored_through_openai_api(tiny_ckpt: Path, tmp_path: Path) -> None:
    port = free_port()
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
        results = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()]
        assert len(results) == 3
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "dsv" in metrics
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
