"""Paged cache: chunked paged forwards equal one dense forward; pool ref counts and prefix reuse.

Run: ``pytest packages/serve/tests/test_serve_paged_cache.py``.
"""

from __future__ import annotations

import torch

from dsv.serve.paged_cache import BlockPool, PagedBatchView, prefix_keys


def test_paged_chunks_match_full_forward() -> None:
    from dsv.core import presets
    from dsv.core.model import DSVForCausalLM
    from dsv.serve.engine import Engine

    torch.manual_seed(0)
    cfg = presets.tiny()
    model = DSVForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 45))
    engine = Engine.for_model(model, cfg, num_blocks=16, block_size=8)
    blocks = engine.pool.allocate(6)[::-1]  # non-contiguous, reversed order on purpose
    out, n = [], 0
    with torch.no_grad():
        full = model(ids).logits
        for a, b in [(0, 13), (13, 30), (30, 31), (31, 45)]:
            view = PagedBatchView(engine.pool, [blocks], [n], b - a)
            out.append(model(ids[:, a:b], cache=view).logits)
            n = b
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=1e-5)


def test_pool_refcounts_and_prefix_cache() -> None:
    pool = BlockPool(num_layers=1, num_blocks=4, block_size=2, kv_dim=3, index_dim=2)
    keys = prefix_keys([1, 2, 3, 4, 5], 2)
    assert len(keys) == 2 and keys != prefix_keys([9, 2, 3, 4], 2)
    a = pool.allocate(3)
    pool.register(a[0], keys[0])
    pool.register(a[1], keys[1])
    assert pool.used_blocks == 3
    pool.release(a)
    assert (pool.used_blocks, pool.cached_blocks, pool.available) == (0, 2, 4)
    hit = pool.match_prefix(keys)
    assert hit == a[:2] and pool.used_blocks == 2
    pool.release(hit)
    pool.allocate(4)  # evicts the cached prefixes
    assert pool.match_prefix(keys) == [] and pool.used_blocks == 4
