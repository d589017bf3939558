"""Paged cache: chunked paged forwards equal one dense forward; pool ref counts and prefix reuse;
the decode staging buffer returns what the paged gather returns, and staged batched decoding (with
rows packed after a sequence leaves) gives each sequence's logits of a decode alone on the core
dense cache (the same decode path; a full forward can differ where DSA top-k has a near tie).

Run: ``pytest packages/serve/tests/test_serve_paged_cache.py``.
"""

from __future__ import annotations

import pytest
import torch

from dsv.serve.paged_cache import BlockPool, DecodeStaging, PagedBatchView, prefix_keys


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
    assert pool.cached_prefix(keys) == 2 and pool.cached_prefix(prefix_keys([9, 2, 3, 4], 2)) == 0
    assert pool.used_blocks == 0 and pool.prefix_hits == 0, "a look takes nothing"
    hit = pool.match_prefix(keys)
    assert hit == a[:2] and pool.used_blocks == 2
    pool.release(hit)
    pool.allocate(4)  # evicts the cached prefixes
    assert pool.match_prefix(keys) == [] and pool.used_blocks == 4


def test_staging_equals_paged_gather() -> None:
    g = torch.Generator().manual_seed(3)
    pool = BlockPool(num_layers=2, num_blocks=24, block_size=4, kv_dim=5, index_dim=3)
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=g))
    assert pool.index_k is not None
    pool.index_k.copy_(torch.randn(pool.index_k.shape, generator=g))
    lengths = [13, 3, 9]
    tables = [pool.allocate(4)[::-1], pool.allocate(2), pool.allocate(3)[::-1]]  # scattered blocks
    staging = DecodeStaging(num_layers=2, kv_dim=5, index_dim=3)
    for row, (table, n) in enumerate(zip(tables, lengths, strict=True)):
        staging.load(row, pool, table, n)  # grows from its initial 1 x 16 as rows arrive
    paged = PagedBatchView(pool, tables, lengths, 1)
    staged = staging.batch(lengths, 1)
    assert torch.equal(paged.offsets(), staged.offsets())
    for layer in range(2):
        kv, ik = torch.randn(3, 1, 5, generator=g), torch.randn(3, 1, 3, generator=g)
        want_kv, want_ik = paged.update(layer, kv, ik)
        got_kv, got_ik = staged.update(layer, kv, ik)
        assert got_kv.shape == want_kv.shape and got_ik is not None and want_ik is not None
        for b, n in enumerate(lengths):  # positions past a row's length are padding on both sides
            assert torch.equal(got_kv[b, : n + 1], want_kv[b, : n + 1])
            assert torch.equal(got_ik[b, : n + 1], want_ik[b, : n + 1])
    # Packing: row 2 moves into row 0; growing keeps every row's contents.
    before = staging.kv[:, 2, :10].clone()
    staging.move(2, 0, 10)
    staging.reserve(staging.rows + 5, staging.length + 40)
    assert torch.equal(staging.kv[:, 0, :10], before)


def test_staged_decode_with_packed_rows_matches_full_forward() -> None:
    from dsv.core import presets
    from dsv.core.cache import DenseKVCache
    from dsv.core.model import DSVForCausalLM

    torch.manual_seed(0)
    cfg = presets.tiny()
    model = DSVForCausalLM(cfg).eval()
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    pool = BlockPool(num_layers=layers, num_blocks=40, block_size=8, kv_dim=cfg.kv_latent_dim,
                     index_dim=cfg.index_head_dim)  # fmt: skip
    staging = DecodeStaging(num_layers=layers, kv_dim=cfg.kv_latent_dim, index_dim=cfg.index_head_dim)
    g = torch.Generator().manual_seed(4)
    # Lengths on both sides of index_topk (32), so both the dense and the DSA decode paths run.
    seqs = [torch.randint(0, cfg.vocab_size, (1, n), generator=g) for n in (40, 30, 40)]
    prompt = [12, 10, 20]
    tables = [pool.allocate(6) for _ in seqs]
    with torch.no_grad():
        for row, (ids, n, table) in enumerate(zip(seqs, prompt, tables, strict=True)):
            model(ids[:, :n], cache=PagedBatchView(pool, [table], [0], n))
            staging.load(row, pool, table, n)
        alone = []
        for ids, n in zip(seqs, prompt, strict=True):
            dense = DenseKVCache(cfg, 1, ids.shape[1])
            model(ids[:, :n], cache=dense)
            alone.append(
                {p: model(ids[:, p : p + 1], cache=dense).logits[0, 0] for p in range(n, ids.shape[1])}
            )
        live = [0, 1, 2]  # live[row] = which sequence sits in that row
        pos = list(prompt)
        for step in range(18):
            if step == 8:  # sequence 0 leaves: the last row moves into row 0
                staging.move(2, 0, pos[2])
                live = [2, 1]
            ids = torch.stack([seqs[i][0, pos[i]] for i in live]).view(-1, 1)
            logits = model(ids, cache=staging.batch([pos[i] for i in live], 1)).logits[:, 0]
            for row, i in enumerate(live):
                torch.testing.assert_close(logits[row], alone[i][pos[i]], atol=1e-4, rtol=1e-4)
                pos[i] += 1


@pytest.mark.parametrize("num_blocks", [None, 64, 96, 257, 4096])
@pytest.mark.parametrize("max_len", [128, 1024, 4096])
def test_cache_budget_keeps_pool_and_staging_rows_within_num_blocks(num_blocks: int | None, max_len: int) -> None:
    from dsv.serve.launch import cache_budget

    bs, batch, full = 16, 8, -(-max_len // 16)
    if num_blocks is not None and num_blocks < full:
        with pytest.raises(ValueError, match="less than one request of the full context length"):
            cache_budget(num_blocks, block_size=bs, max_batch=batch, max_len=max_len, staging=True)
        return
    pool, rows = cache_budget(num_blocks, block_size=bs, max_batch=batch, max_len=max_len, staging=True)
    assert pool >= full  # one full-length request always fits the pool
    if num_blocks is None:
        assert rows == (batch, min(max_len, 1024))
    else:
        staged = 0 if rows is None else -(-rows[0] * rows[1] // bs)
        assert pool + staged <= num_blocks and staged <= num_blocks // 2
        assert rows is None or 1 <= rows[0] <= batch
    assert cache_budget(num_blocks, block_size=bs, max_batch=batch, max_len=max_len, staging=False)[1] is None
