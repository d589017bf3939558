"""The benchmark's load generator against a real server: token counts and TTFT from raw streams,
and a refused request fails the wave instead of counting as zero tokens.

Run: ``pytest packages/serve/tests/test_serve_loadgen.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="module")
def server(tiny_ckpt: Path, live_server: Any) -> Iterator[Any]:
    from dsv.serve import load_native_app

    app = load_native_app(str(tiny_ckpt), model_name="m", max_model_len=256, num_blocks=128)
    with live_server(app) as s:
        yield s


def _loadgen(
    url: str, prompts: list[list[int]], max_tokens: int, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(prompts))
    cmd = [sys.executable, "-m", "dsv.serve.loadgen", url, str(path), str(max_tokens)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_loadgen_counts_every_streamed_token(server: Any, tmp_path: Path) -> None:
    prompts = [[20 + i, 30 + i, 40 + i, 50 + i] for i in range(3)]
    done = _loadgen(server.url, prompts, 7, tmp_path)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["tokens"] == 21, "3 clients x 7 greedy tokens (the random model emits no end token this early)"
    assert 0 < out["ttft_p50"] <= out["ttft_p99"] < out["wall_s"]
    assert out["tok_s"] == pytest.approx(out["tokens"] / out["wall_s"])


def test_loadgen_fails_on_a_refused_request(server: Any, tmp_path: Path) -> None:
    done = _loadgen(server.url, [[20, 30, 40]], 400, tmp_path)  # 3 + 400 tokens > max_model_len 256
    assert done.returncode != 0 and "400" in done.stderr
