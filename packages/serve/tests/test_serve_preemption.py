"""Blocks are taken as outputs grow, and when the pool runs out the newest request is preempted
and recomputed later: a pool that fits three long requests serves eight submitted at once, each
with the output it gets alone (greedy), and the preemptions are counted.

Run: ``pytest packages/serve/tests/test_serve_preemption.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from dsv.serve.engine import Engine, GenParams


@pytest.fixture(scope="module")
def model(tiny_ckpt: Path) -> Any:
    from dsv.core.checkpoint import load_pretrained

    m, _ = load_pretrained(str(tiny_ckpt), with_tokenizer=False)
    return m.eval()


@pytest.mark.parametrize("staging", [True, False], ids=["staged", "paged"])
def test_eight_long_requests_in_a_pool_for_three(model: Any, staging: bool) -> None:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, 1000, (20,), generator=g).tolist() for _ in range(8)]
    greedy = GenParams(temperature=0.0, max_tokens=76)  # 20 + 76 tokens: 6 blocks of 16
    alone = [Engine.for_model(model, model.config, num_blocks=64, staging=staging).generate_many([p], greedy)[0]
             for p in prompts]  # fmt: skip
    engine = Engine.for_model(model, model.config, num_blocks=18, staging=staging)  # three requests' worth
    out = engine.generate_many(prompts, greedy)
    assert [o.finish_reason for o in out] == ["length"] * 8
    assert [o.tokens for o in out] == [a.tokens for a in alone]
    stats = engine.stats()
    assert stats.preemptions > 0 and stats.used_blocks == 0
    assert [o.prompt_tokens for o in out] == [20] * 8


def test_a_preempted_recording_request_keeps_every_route(model: Any) -> None:
    """RL's record survives a preemption: the routes cover prompt + output - 1 positions, equal to
    the ones recorded without preemption."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 1000, (20,), generator=g).tolist() for _ in range(5)]
    params = GenParams(temperature=0.0, max_tokens=60, record=True)
    roomy = Engine.for_model(model, model.config, num_blocks=64).generate_many(prompts, params)
    tight_engine = Engine.for_model(model, model.config, num_blocks=12)
    tight = tight_engine.generate_many(prompts, params)
    assert tight_engine.stats().preemptions > 0
    for a, b in zip(roomy, tight, strict=True):
        assert a.tokens == b.tokens
        assert a.routes is not None and b.routes is not None
        for ra, rb in zip(a.routes, b.routes, strict=True):
            assert (ra is None) == (rb is None)
            if ra is not None:
                assert ra.shape[0] == 20 + 60 - 1 and torch.equal(ra, rb)


def test_64_requests_in_a_small_pool_stay_within_it(model: Any) -> None:
    """Decoding from the pool (no staging rows): the cache is the pool's tensors and nothing else,
    64 requests that would need four times its blocks all finish, each as in a roomy pool."""
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(10, 1000, (int(torch.randint(4, 40, (1,), generator=g)),), generator=g).tolist()
               for _ in range(64)]  # fmt: skip
    greedy = GenParams(temperature=0.0, max_tokens=24)
    roomy = Engine.for_model(model, model.config, num_blocks=512, staging=False).generate_many(prompts, greedy)
    engine = Engine.for_model(model, model.config, num_blocks=48, staging=False, max_batch=64)
    pool_bytes = engine.pool.nbytes
    out = engine.generate_many(prompts, greedy)
    assert [o.tokens for o in out] == [r.tokens for r in roomy]
    assert engine.staging is None and engine.stats().used_blocks == 0
    assert engine.pool.nbytes == pool_bytes
    need = sum(-(-(len(p) + 24) // 16) for p in prompts)
    assert need > 4 * engine.pool.num_blocks


def test_preemptions_show_in_metrics_and_the_status_line(tiny_ckpt: Path, live_server: Any) -> None:
    import threading

    import httpx

    from dsv.serve import load_native_app

    app: Any = load_native_app(str(tiny_ckpt), model_name="m", max_model_len=128, num_blocks=8, staging=False,
                               engine_process=False)  # fmt: skip
    with live_server(app) as server:
        def one(i: int) -> None:
            body = {"model": "m", "prompt": [10 + i] * 20, "max_tokens": 100, "temperature": 0}
            assert httpx.post(server.url + "/v1/completions", json=body, timeout=300).status_code == 200

        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        text = httpx.get(server.url + "/metrics").text
        line = app.state.metrics.status_line({"prompt_tokens": 0, "generated_tokens": 0},
                                             {"prompt_tokens": 0, "generated_tokens": 0}, 1.0)  # fmt: skip
    assert app.state.backend.stats()["preemptions"] > 0
    assert "dsv_preemptions_total" in text and 'vllm:num_preemptions_total{model_name="m"}' in text
    assert "preempted" in line and "preempted 0" not in line


def _cache_bytes(engine: Engine) -> int:
    return engine.pool.nbytes + (engine.staging.nbytes if engine.staging is not None else 0)


def test_fixed_staging_rows_mix_staged_paged_and_outgrown_sequences(model: Any) -> None:
    """Staging rows allocated once (a server's budget): two rows of 48 positions for six requests,
    so some decode staged, some from the pool, and the long ones outgrow their row mid-output and
    move to their pool blocks. Every output equals the one it gets alone; nothing grows."""
    g = torch.Generator().manual_seed(3)
    lengths = [10, 30, 12, 40, 8, 25]
    prompts = [torch.randint(10, 1000, (n,), generator=g).tolist() for n in lengths]
    greedy = GenParams(temperature=0.0, max_tokens=30)
    alone = [Engine.for_model(model, model.config, num_blocks=64, staging=False).generate_many([p], greedy)[0]
             for p in prompts]  # fmt: skip
    engine = Engine.for_model(model, model.config, num_blocks=64, staging_capacity=(2, 48))
    before = _cache_bytes(engine)
    staged_forwards: list[int] = []
    run = engine._run

    def counting(seqs: list[Any], inputs: list[list[int]], staged: bool = False) -> Any:
        if staged:
            staged_forwards.append(len(seqs))
        return run(seqs, inputs, staged)

    moved: list[int] = []
    unstage = engine._unstage

    def counting_moves(seq: Any) -> None:
        moved.append(seq.cached)
        unstage(seq)

    engine._run = counting  # type: ignore[method-assign]
    engine._unstage = counting_moves  # type: ignore[method-assign]
    out = engine.generate_many(prompts, greedy)
    assert [o.tokens for o in out] == [a.tokens for a in alone]
    assert staged_forwards and max(staged_forwards) == 2  # the rows were used, never more than two
    assert moved and all(n == 48 for n in moved)  # outgrown rows moved to the pool when full
    assert engine.staging is not None and engine.staging.kv.shape[1:3] == (2, 48)
    assert _cache_bytes(engine) == before and engine.stats().used_blocks == 0


def test_the_server_cache_stays_within_num_blocks_while_64_clients_stream(tiny_ckpt: Path, live_server: Any) -> None:
    """``--num-blocks`` bounds the whole cache with the default (staged) decode: the pool and the
    staging rows together are the budget's bytes, sampled while 64 streaming clients run, and every
    client gets its whole answer."""
    import threading

    import httpx

    from dsv.serve import load_native_app

    num_blocks, block_size = 96, 16
    app: Any = load_native_app(str(tiny_ckpt), model_name="m", max_model_len=256, num_blocks=num_blocks,
                               block_size=block_size, max_batch=64, engine_process=False)  # fmt: skip
    engine = app.state.backend.engine
    assert engine.staging is not None and engine.staging.fixed
    budget = num_blocks * engine.pool.nbytes // engine.pool.num_blocks
    peak = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _cache_bytes(engine))
            done.wait(0.01)

    answers: dict[int, int] = {}

    def client(i: int) -> None:
        body = {"model": "m", "prompt": [10 + i % 50] * (8 + i % 40), "max_tokens": 40, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
        with httpx.stream("POST", app_url[0] + "/v1/completions", json=body, timeout=600) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {") and (usage := json.loads(line[6:]).get("usage")):
                    answers[i] = usage["completion_tokens"]

    app_url: list[str] = []
    with live_server(app) as server:
        app_url.append(server.url)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()
        watcher.join()
    assert answers == {i: 40 for i in range(64)}
    assert 0 < peak[0] <= budget, (peak[0], budget)
    assert engine.stats().preemptions > 0  # the pool was really short: 64 x (up to 47 + 40) tokens
