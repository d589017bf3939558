"""Paged KV cache for the serve engine: a block pool shared by all sequences, ref-counted blocks,
and prefix caching of full prompt blocks.

Storage per layer is ``kv [num_blocks * block_size, kv_lora_rank + qk_rope_head_dim]`` (the MLA
latent) and ``index_k [num_blocks * block_size, index_head_dim]`` (the DSA indexer keys). A
sequence owns a block table (block ids in position order). :class:`PagedBatchView` implements the
core :class:`dsv.core.cache.KVCache` protocol for one forward over a set of sequences: it scatters
the new rows into their slots and gathers each row's past back into a padded ``[B, T, D]`` tensor.

Decoding reads a staging buffer instead (:class:`DecodeStaging`): every decoding sequence owns one
row of a dense ``[layers, rows, length, D]`` tensor, copied from its blocks once when its prompt is
done, and rows are kept packed (a sequence that ends hands its row to the last one). A decode step
over ``n`` sequences then sees ``rows[:n, :T]`` as a view (:class:`StagedBatchView`): it writes one
row per sequence and copies nothing, where gathering every block of every sequence for every layer
would copy ``O(n * T)`` rows per layer per step. Decode rows are not written to the pool (only full
prompt blocks are ever shared through the prefix cache).

Prefix caching: a full block of prompt tokens is keyed by ``hash(parent key, its tokens)`` once
its rows are written. A new sequence whose prompt starts with cached blocks takes them (refcount
+1) and skips that part of the prefill. A block whose refcount drops to zero goes back to the pool
at once; if it holds a cached prefix it stays findable until the pool needs it again (LRU).
A cached prefix can also carry the MoE routes its tokens took (:meth:`BlockPool.set_routes`), so a
sequence that records routes (RL's Keep Routing) gets its whole prompt's routes even when part of
the prompt came from the cache. New weights make every cached row stale:
:meth:`BlockPool.clear_prefix_cache` forgets them all.

Run the checks: ``pytest packages/serve/tests/test_serve_paged_cache.py``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import torch

from dsv.core.cache import PagedRows

__all__ = ["BlockPool", "DecodeStaging", "OutOfBlocks", "PagedBatchView", "StagedBatchView", "prefix_keys"]


class OutOfBlocks(RuntimeError):
    """The pool cannot provide the blocks asked for."""


def prefix_keys(tokens: Sequence[int], block_size: int) -> list[bytes]:
    """Chained keys of the full blocks of ``tokens`` (key i covers tokens ``[0, (i+1)*block_size)``)."""
    keys, parent = [], b""
    for i in range(len(tokens) // block_size):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(repr(list(tokens[i * block_size : (i + 1) * block_size])).encode())
        parent = h.digest()
        keys.append(parent)
    return keys


class BlockPool:
    """Fixed pool of cache blocks with ref counts and a prefix cache.

    Blocks are in one of three states: used (refcount > 0), cached (refcount 0 but holding a
    registered prefix, reusable or evictable), free. ``used_blocks`` is the number in use; it
    returns to 0 when no request is running.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        kv_dim: int,
        index_dim: int | None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        slots = num_blocks * block_size
        self.kv = torch.zeros(num_layers, slots, kv_dim, device=device, dtype=dtype)
        self.index_k = (
            torch.zeros(num_layers, slots, index_dim, device=device, dtype=dtype) if index_dim else None
        )
        self.refcount = [0] * num_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._cached: OrderedDict[int, bytes] = OrderedDict()  # refcount-0 blocks with a prefix, LRU order
        self._by_key: dict[bytes, int] = {}
        self._key_of: dict[int, bytes] = {}
        # Per cached prefix, the MoE routes of its block's tokens (per layer [block_size, k], None
        # for dense layers), when a sequence that records routes computed it.
        self._routes: dict[bytes, list[torch.Tensor | None]] = {}
        self.prefix_hits = 0  # blocks reused from the prefix cache, for metrics

    # -------------------------------------------------------------- accounting
    @property
    def nbytes(self) -> int:
        """Bytes the blocks take (latent and indexer keys)."""
        return _nbytes(self.kv, self.index_k)

    def slots(self, blocks: Sequence[int], length: int) -> torch.Tensor:
        """The cache rows (``kv[:, slots]``) of a sequence's first ``length`` positions in ``blocks``."""
        bs = self.block_size
        table = torch.tensor(list(blocks[: (length + bs - 1) // bs]), dtype=torch.long)
        slots = (table.view(-1, 1) * bs + torch.arange(bs).view(1, -1)).reshape(-1)[:length]
        return slots.to(self.kv.device)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free) - len(self._cached)

    @property
    def cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def available(self) -> int:
        """Blocks that can be handed out now (free plus evictable cached ones)."""
        return len(self._free) + len(self._cached)

    # -------------------------------------------------------------- allocation
    def cached_prefix(self, keys: Sequence[bytes], *, routed: bool = False) -> int:
        """How many of ``keys``, from the first, :meth:`match_prefix` would find now (nothing is
        taken); with ``routed``, only as far as the cached blocks also carry their routes."""
        n = 0
        while n < len(keys) and keys[n] in self._by_key and (not routed or keys[n] in self._routes):
            n += 1
        return n

    def match_prefix(self, keys: Sequence[bytes]) -> list[int]:
        """Longest run of cached blocks for ``keys``; each returned block gets refcount +1."""
        out = []
        for key in keys:
            block = self._by_key.get(key)
            if block is None:
                break
            self._take(block)
            out.append(block)
        self.prefix_hits += len(out)
        return out

    def allocate(self, n: int) -> list[int]:
        """``n`` fresh blocks (refcount 1), evicting least recently used cached prefixes if needed."""
        if n > self.available:
            raise OutOfBlocks(f"need {n} blocks, {self.available} available")
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:
                block, key = self._cached.popitem(last=False)
                del self._by_key[key], self._key_of[block]
                self._routes.pop(key, None)
            self.refcount[block] = 1
            out.append(block)
        return out

    def register(self, block: int, key: bytes) -> None:
        """Mark ``block`` (fully written) as holding the prefix ``key``."""
        if key in self._by_key or block in self._key_of:
            return
        self._by_key[key], self._key_of[block] = block, key

    def set_routes(self, key: bytes, routes: list[torch.Tensor | None]) -> None:
        """Keep the routes of the tokens of the cached prefix ``key`` (ignored when ``key`` is not
        cached or already has them)."""
        if key in self._by_key:
            self._routes.setdefault(key, routes)

    def routes_of(self, key: bytes) -> list[torch.Tensor | None] | None:
        """The routes kept for ``key`` by :meth:`set_routes` (None when it has none)."""
        return self._routes.get(key)

    def clear_prefix_cache(self) -> None:
        """Forget every cached prefix (and its routes): unreferenced blocks become free, blocks in
        use are no longer findable and go back as plain free blocks when released."""
        self._free.extend(self._cached)
        self._cached.clear()
        self._by_key.clear()
        self._key_of.clear()
        self._routes.clear()

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; unreferenced blocks are available again at once."""
        for block in blocks:
            assert self.refcount[block] > 0, f"block {block} released more often than taken"
            self.refcount[block] -= 1
            if self.refcount[block] == 0:
                key = self._key_of.get(block)
                if key is None:
                    self._free.append(block)
                else:
                    self._cached[block] = key

    def _take(self, block: int) -> None:
        if self.refcount[block] == 0:
            self._cached.pop(block, None)
        self.refcount[block] += 1


class PagedBatchView:
    """The :class:`dsv.core.cache.KVCache` protocol over pool blocks for one forward.

    ``tables[b]`` is row b's block table and ``lengths[b]`` its tokens already cached; every row
    gets ``new_tokens`` new tokens in this forward.
    """

    def __init__(
        self, pool: BlockPool, tables: Sequence[Sequence[int]], lengths: Sequence[int], new_tokens: int
    ) -> None:
        self.pool = pool
        device = pool.kv.device
        bs = pool.block_size
        B, S = len(tables), new_tokens
        self._offsets = torch.tensor(list(lengths), dtype=torch.long, device=device)
        T = max(lengths) + S
        # Slot of absolute position p in row b: table[b][p // bs] * bs + p % bs.
        nb = (T + bs - 1) // bs
        table = torch.tensor([[*t[:nb], *([0] * (nb - min(len(t), nb)))] for t in tables], dtype=torch.long)
        pos = torch.arange(T)
        gather = table[:, pos // bs] * bs + pos % bs  # (B, T)
        self._table = table.to(device=device, dtype=torch.int32)
        valid = pos.view(1, T) < (self._offsets.cpu().view(B, 1) + S)
        self._gather = torch.where(valid, gather, torch.zeros_like(gather)).to(device)  # padding reads slot 0
        write_pos = self._offsets.cpu().view(B, 1) + torch.arange(S).view(1, S)  # (B, S)
        self._write = torch.gather(gather, 1, write_pos).to(device)  # (B, S)

    def offsets(self) -> torch.Tensor:
        return self._offsets

    def update(
        self, layer: int, kv: torch.Tensor, index_k: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = self.update_paged(layer, kv, index_k)
        gathered_ik = None if rows.index_k is None else rows.index_k[rows.slots]
        return rows.kv[rows.slots], gathered_ik  # (B, T, D), (B, T, D_I)

    def update_paged(self, layer: int, kv: torch.Tensor, index_k: torch.Tensor | None) -> PagedRows:
        """:meth:`update` without gathering anything: the layer's stores, each position's slot and the
        block tables (the kernels read the rows they need in place)."""
        flat = self._write.reshape(-1)
        store = self.pool.kv[layer]
        store[flat] = kv.reshape(-1, kv.shape[-1]).to(store.dtype)
        istore = None
        if index_k is not None:
            assert self.pool.index_k is not None, "pool built without indexer storage"
            istore = self.pool.index_k[layer]
            istore[flat] = index_k.reshape(-1, index_k.shape[-1]).to(istore.dtype)
        return PagedRows(store, self._gather, istore, self._table, self.pool.block_size)

    def advance(self, n: int) -> None:
        self._offsets += n


def _nbytes(kv: torch.Tensor, index_k: torch.Tensor | None) -> int:
    return kv.nbytes + (0 if index_k is None else index_k.nbytes)


def _grow(t: torch.Tensor | None, rows: int, length: int) -> torch.Tensor | None:
    if t is None or (t.shape[1] >= rows and t.shape[2] >= length):
        return t
    new = t.new_zeros(t.shape[0], max(rows, t.shape[1]), max(length, t.shape[2]), t.shape[3])
    new[:, : t.shape[1], : t.shape[2]] = t
    return new


class DecodeStaging:
    """Dense per-sequence rows for decoding: ``kv [layers, rows, length, D]`` (and ``index_k``).

    Without ``capacity`` the rows grow by doubling (rows and length), so memory follows the real
    batch and context. With ``capacity=(rows, length)`` they are allocated once at that size and
    never grow: a server sizes them out of its cache budget, and the engine decodes a sequence here
    only while it :meth:`fits`.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        kv_dim: int,
        index_dim: int | None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        capacity: tuple[int, int] | None = None,
    ) -> None:
        rows, length = capacity or (1, 16)
        if rows < 1 or length < 1:
            raise ValueError(f"staging capacity must be at least one row of one token, got {capacity}")
        self.fixed = capacity is not None
        self.kv: torch.Tensor = torch.zeros(num_layers, rows, length, kv_dim, device=device, dtype=dtype)
        self.index_k = (
            torch.zeros(num_layers, rows, length, index_dim, device=device, dtype=dtype) if index_dim else None
        )

    @property
    def nbytes(self) -> int:
        """Bytes the rows take (latent and indexer keys)."""
        return _nbytes(self.kv, self.index_k)

    def fits(self, rows: int, length: int) -> bool:
        """Whether ``rows`` rows of ``length`` positions fit without growing (always, unbounded)."""
        return not self.fixed or (rows <= self.rows and length <= self.length)

    @property
    def rows(self) -> int:
        return self.kv.shape[1]

    @property
    def length(self) -> int:
        return self.kv.shape[2]

    def reserve(self, rows: int, length: int) -> None:
        """Make room for ``rows`` rows of ``length`` positions (doubling what is short)."""
        if rows <= self.rows and length <= self.length:
            return
        if self.fixed:
            raise ValueError(f"staging holds {self.rows} rows of {self.length} positions; asked for {rows} x {length}")
        r = self.rows if rows <= self.rows else max(rows, 2 * self.rows)
        n = self.length if length <= self.length else max(length, 2 * self.length)
        self.kv = _grow(self.kv, r, n)  # type: ignore[assignment]
        self.index_k = _grow(self.index_k, r, n)

    def load(self, row: int, pool: BlockPool, blocks: Sequence[int], length: int) -> None:
        """Copy the first ``length`` cached positions of a sequence (its ``blocks``) into ``row``."""
        self.reserve(row + 1, length)
        slots = pool.slots(blocks, length)
        self.kv[:, row, :length] = pool.kv[:, slots]
        if self.index_k is not None:
            assert pool.index_k is not None, "pool built without indexer storage"
            self.index_k[:, row, :length] = pool.index_k[:, slots]

    def store(self, row: int, pool: BlockPool, blocks: Sequence[int], length: int) -> None:
        """Copy the first ``length`` positions of ``row`` into the sequence's pool ``blocks`` (the
        reverse of :meth:`load`: the sequence goes on decoding from the pool)."""
        slots = pool.slots(blocks, length)
        pool.kv[:, slots] = self.kv[:, row, :length]
        if self.index_k is not None:
            assert pool.index_k is not None, "pool built without indexer storage"
            pool.index_k[:, slots] = self.index_k[:, row, :length]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row ``src``'s first ``length`` positions to row ``dst`` (packing the rows)."""
        self.kv[:, dst, :length] = self.kv[:, src, :length]
        if self.index_k is not None:
            self.index_k[:, dst, :length] = self.index_k[:, src, :length]

    def batch(
        self, lengths: Sequence[int], new_tokens: int, rows: Sequence[int] | None = None
    ) -> StagedBatchView:
        """The cache of rows ``0..len(lengths)-1`` (row b holds ``lengths[b]`` tokens) for one forward,
        or of the given ``rows`` (gathered, not a view: the engine's slow path that retries a failed
        decode step row by row)."""
        self.reserve(len(lengths) if rows is None else max(rows) + 1, max(lengths) + new_tokens)
        return StagedBatchView(self, lengths, new_tokens, rows)


class StagedBatchView:
    """The :class:`dsv.core.cache.KVCache` protocol over the first rows of a :class:`DecodeStaging`.

    ``update`` writes each row's new positions in place and returns ``rows[:B, :T]``, a view: past
    positions are never copied. Positions past a row's length hold whatever an earlier occupant
    left there; the model never attends them (key ``s`` is visible to query ``t`` of row ``b`` only
    when ``s <= offsets[b] + t``).
    """

    def __init__(
        self, staging: DecodeStaging, lengths: Sequence[int], new_tokens: int, rows: Sequence[int] | None = None
    ) -> None:
        self.staging = staging
        device = staging.kv.device
        B, S = len(lengths), new_tokens
        self._offsets = torch.tensor(list(lengths), dtype=torch.long, device=device)
        self._T = max(lengths) + S
        self._picked = None if rows is None else torch.tensor(list(rows), dtype=torch.long, device=device)
        order = torch.arange(B, device=device) if self._picked is None else self._picked
        self._rows = order.view(B, 1).expand(B, S)
        self._pos = self._offsets.view(B, 1) + torch.arange(S, device=device).view(1, S)  # (B, S)

    def offsets(self) -> torch.Tensor:
        return self._offsets

    def update(
        self, layer: int, kv: torch.Tensor, index_k: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B = kv.shape[0]
        store = self.staging.kv[layer]
        store[self._rows, self._pos] = kv.to(store.dtype)
        ik_all = None
        if index_k is not None:
            assert self.staging.index_k is not None, "staging built without indexer storage"
            istore = self.staging.index_k[layer]
            istore[self._rows, self._pos] = index_k.to(istore.dtype)
            ik_all = istore[:B, : self._T] if self._picked is None else istore[self._picked, : self._T]
        if self._picked is not None:
            return store[self._picked, : self._T], ik_all
        return store[:B, : self._T], ik_all

    def advance(self, n: int) -> None:
        self._offsets += n
        self._pos = self._pos + n
