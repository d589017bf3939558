"""KV cache for MLA + DSA: per layer, the 576-wide latent row (``c_kv`` ‖ ``k_pe``) and the
indexer key (``index_head_dim`` wide) of every past token.

:class:`KVCache` is the protocol the model talks to, so an engine can bring its own storage (the
serve engine's paged block pool implements it); :class:`DenseKVCache` is the contiguous version
used by :func:`dsv.core.generate.generate`.

Rows of a batch may hold different numbers of tokens (``offsets``). ``update`` returns the rows
padded at the end to the longest one; the padding is never attended because key ``s`` is visible to
query ``t`` of row ``b`` only when ``s <= offsets[b] + t``.

A paged cache may also offer :class:`PagedRows` through ``update_paged``: the layer's whole latent
store and each position's row in it, so the sparse attention kernel reads the selected rows where
they are instead of a gathered ``[B, T, 576]`` copy (the model uses it where the Triton kernels run).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import torch

from dsv.core.config import ModelConfig


@runtime_checkable
class KVCache(Protocol):
    """What the model needs from a cache."""

    def offsets(self) -> torch.Tensor:
        """LongTensor ``[B]``: tokens already cached per row (absolute position of the next token)."""
        ...

    def update(
        self, layer: int, kv: torch.Tensor, index_k: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append ``kv [B,S,D]`` (and ``index_k [B,S,D_I]``) for ``layer``; return all rows ``[B,T,...]``."""
        ...

    def advance(self, n: int) -> None:
        """Mark ``n`` more tokens cached in every row (called once per forward, after all layers)."""
        ...


class PagedRows(NamedTuple):
    """One layer of a paged cache as the kernels read it (see :meth:`PagedKVCache.update_paged`)."""

    kv: torch.Tensor  # [P, D]: the layer's latent store, every block of the pool
    slots: torch.Tensor  # [B, T] int64: the row of ``kv`` (and ``index_k``) holding position t of batch row b
    index_k: torch.Tensor | None  # [P, D_I]: the layer's indexer-key store (None without an indexer)
    block_table: torch.Tensor  # [B, blocks] int32: row b's blocks in order (``slots`` spelled per block)
    block_size: int


@runtime_checkable
class PagedKVCache(KVCache, Protocol):
    """A :class:`KVCache` whose rows live in a shared block pool."""

    def update_paged(self, layer: int, kv: torch.Tensor, index_k: torch.Tensor | None) -> PagedRows:
        """Append as :meth:`KVCache.update` does; return the stores, the rows of every position and the
        block tables (``slots`` past a row's length point anywhere in ``kv``: causality masks them)."""
        ...


class DenseKVCache:
    """Contiguous cache of ``max_len`` tokens per row, preallocated."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        num_layers: int | None = None,
    ) -> None:
        layers = (
            config.num_hidden_layers + config.num_nextn_predict_layers if num_layers is None else num_layers
        )
        self.max_len = max_len
        self.kv = torch.zeros(layers, batch_size, max_len, config.kv_latent_dim, device=device, dtype=dtype)
        self.index_k = (
            torch.zeros(layers, batch_size, max_len, config.index_head_dim, device=device, dtype=dtype)
            if config.has_indexer
            else None
        )
        self._offsets = torch.zeros(batch_size, dtype=torch.long, device=device)

    def offsets(self) -> torch.Tensor:
        return self._offsets

    def _write(self, store: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        B, S = new.shape[:2]
        end = int(self._offsets.max()) + S
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: need {end} positions, cache holds max_len={self.max_len}")
        if bool((self._offsets == self._offsets[0]).all()):
            start = int(self._offsets[0])
            store[:, start : start + S] = new.to(store.dtype)
        else:
            pos = self._offsets.view(B, 1) + torch.arange(S, device=new.device).view(1, S)  # (B, S)
            store[torch.arange(B, device=new.device).view(B, 1), pos] = new.to(store.dtype)
        return store[:, :end]

    def update(
        self, layer: int, kv: torch.Tensor, index_k: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        kv_all = self._write(self.kv[layer], kv)
        ik_all = None
        if index_k is not None:
            assert self.index_k is not None, "this cache was built for a config without an indexer"
            ik_all = self._write(self.index_k[layer], index_k)
        return kv_all, ik_all

    def advance(self, n: int) -> None:
        self._offsets += n

    def bytes_per_token(self) -> int:
        """Bytes stored per token over all layers (latent + indexer keys)."""
        per = self.kv.shape[0] * self.kv.shape[-1] * self.kv.element_size()
        if self.index_k is not None:
            per += self.index_k.shape[0] * self.index_k.shape[-1] * self.index_k.element_size()
        return per
