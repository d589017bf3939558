"""``dsv bench kernels``: DSA kernels vs. dense attention across context lengths, checked and put
against the device's peak.

For each model shape (a dsv.core preset: ``small``, ``v32`` = 128 heads, 512+64 latent, k=2048) and
each context length it times, on the same inputs and in the same run:

- ``indexer``  lightning-indexer scores for a prefill (causal pairs counted in FLOP/s); from 64K
  context on, for the last queries only (``queries`` column, see :func:`query_chunk`): the full
  ``[L, L]`` fp32 score matrix is 64 GiB at 128K;
- ``topk``     top-k selection over those score rows;
- ``sparse_prefill`` sparse MLA forward (absorbed form) over a real selection: random indexer
  q/k/w -> indexer scores -> top-k, K = min(index_topk, L) picks per query (-1 where fewer keys are
  visible), built chunk by chunk like the indexer rows; FLOP/s count the valid picks only;
- ``dense_prefill``  torch SDPA causal attention in MHA form (qk = nope+rope, v = v_head_dim), the
  dense baseline;
- ``sparse_decode`` / ``dense_decode`` one new token per sequence against an L-token latent cache
  (sparse: the top-k of that token's own indexer scores; dense: SDPA with the heads as the queries of
  the one shared latent head, as FlashMLA decodes), once per ``--batches`` entry (default 1 and 64
  sequences on CUDA: batch 1 is the latency case that leaves most SMs idle, 64 the throughput case).

The SDPA backend is not assumed: :func:`pick_sdpa_backend` tries FLASH_ATTENTION, CUDNN_ATTENTION,
EFFICIENT_ATTENTION and MATH in that order on the benchmark's own tensors and times the first one that
runs (flash refuses q/k head dim 192 with v 128, and the 576/512 latent of the decode); the ``impl``
column names it. Every timed kernel's output is compared once with its torch reference at the
benchmark shape or, where the reference would not fit, a slice of it (the last queries; two heads of
the dense prefill): ``max err`` is ``max |out - ref| / max |ref|`` (top-k: the fraction of picks that
differ), ``check`` is pass when it is within :data:`CHECK_TOL`, and the command exits 1 when a dsv
kernel fails. The torch rows are the references themselves and are not checked. ``% peak`` and
``% BW`` relate TFLOP/s and GB/s to the device's dense bf16 peak and HBM bandwidth
(:data:`DEVICE_PEAKS`; an unknown device, a CPU or an fp32 run shows no FLOP percentage).

Implementation: ``triton`` (dsv.kernels) on CUDA, ``torch`` (the dsv.core references) anywhere. On
CUDA times come from ``triton.testing.do_bench`` (median) and memory from
``torch.cuda.max_memory_allocated``; on CPU from ``time.perf_counter`` (median of ``--repeats``) with
no memory column. ``--backend triton --device cpu`` runs the kernels in Triton's interpreter — only
useful at tiny sizes to check the code path. Writes ``kernels_bench.json``, ``kernels_bench.md`` (the
table) and ``kernels_bench.png`` to ``--out``.

Run: ``dsv bench kernels --device cpu --preset small --contexts 1024,2048``.
"""

# ruff: noqa: B023  (each timed closure runs inside the iteration that builds it)
from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEVICE_PEAKS",
    "BenchShape",
    "DevicePeak",
    "bench_app",
    "device_peak",
    "pick_sdpa_backend",
    "query_chunk",
    "run_benchmarks",
]

ALL_OPS = ("indexer", "topk", "sparse_prefill", "dense_prefill", "sparse_decode", "dense_decode")
SDPA_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")  # tried in this order
# max |out - ref| / max |ref|, as the kernel tests allow (fp32 inputs run IEEE fp32 dots, bf16 round the output)
CHECK_TOL = {"bf16": 2e-2, "fp32": 1e-4}
CHECK_QUERIES = 16  # queries (rows) compared where the reference at the full benchmark shape is too big


@dataclass(frozen=True, kw_only=True)
class DevicePeak:
    """A GPU's dense bf16 tensor-core peak and HBM bandwidth (vendor data-sheet numbers)."""

    name: str
    bf16_tflops: float
    hbm_tbps: float


DEVICE_PEAKS = (
    DevicePeak(name="H100 SXM", bf16_tflops=989.0, hbm_tbps=3.35),
    DevicePeak(name="H200", bf16_tflops=989.0, hbm_tbps=4.8),
    DevicePeak(name="H800", bf16_tflops=989.0, hbm_tbps=3.35),
)


def device_peak(device_name: str) -> DevicePeak | None:
    """The :data:`DEVICE_PEAKS` entry for a ``torch.cuda.get_device_name()`` string, ``None`` if unknown.

    Only the SXM parts are listed: the PCIe and NVL boards (e.g. "NVIDIA H100 PCIe", 756 TFLOP/s and
    2 TB/s) have other peaks and get no percentage rather than a wrong one. "NVIDIA H100 80GB HBM3" is
    the SXM H100's name.
    """
    name = device_name.upper()
    if "PCIE" in name or "NVL" in name:
        return None
    by = {p.name: p for p in DEVICE_PEAKS}
    if "H200" in name:
        return by["H200"]
    if "H800" in name:
        return by["H800"]
    if "H100" in name and ("SXM" in name or "HBM3" in name):
        return by["H100 SXM"]
    return None


@dataclass(frozen=True, kw_only=True)
class BenchShape:
    """The attention dimensions a benchmark needs, read from a dsv.core preset."""

    name: str
    heads: int
    kv_lora_rank: int
    rope_dim: int
    nope_dim: int
    v_head_dim: int
    index_heads: int
    index_dim: int
    index_topk: int

    @property
    def d_qk(self) -> int:
        return self.kv_lora_rank + self.rope_dim

    @classmethod
    def from_preset(cls, name: str) -> BenchShape:
        from dsv.core import presets

        cfg = presets.preset(name)
        return cls(
            name=name,
            heads=cfg.num_attention_heads,
            kv_lora_rank=cfg.kv_lora_rank,
            rope_dim=cfg.qk_rope_head_dim,
            nope_dim=cfg.qk_nope_head_dim,
            v_head_dim=cfg.v_head_dim,
            index_heads=cfg.index_n_heads,
            index_dim=cfg.index_head_dim,
            index_topk=cfg.index_topk,
        )


def _timer(device: str, repeats: int) -> Callable[[Callable[[], object]], float]:
    """Returns a function that times a closure in milliseconds (median)."""
    if device == "cuda":
        import triton.testing

        def cuda_time(fn: Callable[[], object]) -> float:
            return float(
                triton.testing.do_bench(fn, warmup=10, rep=max(50, 20 * repeats), return_mode="median")
            )

        return cuda_time

    def cpu_time(fn: Callable[[], object]) -> float:
        fn()  # warm-up (allocations, interpreter caches)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_time


@contextlib.contextmanager
def _sdpa_only(name: str) -> Iterator[None]:
    """Restrict torch SDPA to the one backend ``name`` (a ``SDPBackend`` member name)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a refused backend warns with its reason before raising
        with sdpa_kernel([getattr(SDPBackend, name)]):
            yield


def pick_sdpa_backend(call: Callable[[], torch.Tensor]) -> tuple[str, torch.Tensor]:
    """Run ``call`` (one SDPA call) under each of :data:`SDPA_BACKENDS` alone, in order, and return
    the name of the first backend that runs it, with its output. torch's own choice is not asked:
    with several allowed it falls through silently, and the table must say which kernel it timed."""
    import torch
    from torch.nn.attention import SDPBackend

    refused = []
    for name in SDPA_BACKENDS:
        if not hasattr(SDPBackend, name):  # a torch build without that backend
            continue
        try:
            with _sdpa_only(name):
                return name, call()
        except RuntimeError as exc:  # "No available kernel", or out of memory (the math backend at 128K)
            refused.append(f"{name}: {(str(exc).splitlines() or ['?'])[0]}")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    raise RuntimeError("no SDPA backend runs these shapes: " + "; ".join(refused))


def _rel_err(out: torch.Tensor, want: torch.Tensor) -> float:
    """``max |out - want| / max |want|`` over the finite entries of ``want``; ``inf`` where the two
    disagree on which entries are ``-inf`` (the indexer's masked future keys)."""
    import torch

    out, want = out.float(), want.float()
    finite = torch.isfinite(want)
    if not torch.equal(finite, torch.isfinite(out)) or not torch.equal(out[~finite], want[~finite]):
        return math.inf
    if not bool(finite.any()):
        return 0.0
    scale = want[finite].abs().max().clamp_min(1e-12)
    return float((out[finite] - want[finite]).abs().max() / scale)


def _pick_mismatch(got: torch.Tensor, want: torch.Tensor) -> float:
    """Fraction of top-k picks that differ between two selections (rows compared as sorted sets)."""
    a, b = got.long().sort(dim=-1).values, want.long().sort(dim=-1).values
    if a.shape != b.shape:
        return 1.0
    return float((a != b).float().mean()) if a.numel() else 0.0


def _attention_fp32(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, q_start: int | None = None
) -> torch.Tensor:
    """Plain softmax attention in fp32, ``q [..., Q, D]``, ``k [..., T, D]``, ``v [..., T, Dv]``; with
    ``q_start`` causal, query ``i`` sitting at position ``q_start + i``."""
    import torch

    logits = q.float() @ k.float().transpose(-1, -2) * scale
    if q_start is not None:
        Q, T = q.shape[-2], k.shape[-2]
        pos = torch.arange(Q, device=q.device).view(Q, 1) + q_start
        logits = logits.masked_fill(torch.arange(T, device=q.device).view(1, T) > pos, float("-inf"))
    return torch.softmax(logits, dim=-1) @ v.float()


def _edge_queries(L: int, device: str) -> torch.Tensor:
    """The first and last ``CHECK_QUERIES // 2`` query positions (all when ``L`` is that small): the
    start of a sequence has fewer than K visible keys (``-1`` picks), the end the full selection."""
    import torch

    half = CHECK_QUERIES // 2
    if L <= CHECK_QUERIES:
        return torch.arange(L, device=device)
    return torch.cat([torch.arange(half, device=device), torch.arange(L - half, L, device=device)])


def run_benchmarks(
    *,
    shapes: list[BenchShape],
    contexts: list[int],
    batch: int,
    device: str,
    backend: str,
    repeats: int,
    dtype_name: str = "bf16",
    ops: tuple[str, ...] = ALL_OPS,
    progress: Callable[[str], None] | None = None,
    decode_batches: list[int] | None = None,
    check: bool = True,
    peak: DevicePeak | None = None,
) -> list[dict[str, Any]]:
    """Time every op for every (shape, context); returns one record per measurement.

    ``batch`` sequences run the prefill ops, each entry of ``decode_batches`` (default ``[batch]``) the
    decode ops. ``check`` compares each timed kernel once with its torch reference (``max_err``,
    ``check``). ``peak`` (default: looked up from the CUDA device's name) sets the percentage columns.
    """
    import torch
    import torch.nn.functional as F

    from dsv.core import attention as ref

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    triton_impl = backend == "triton"
    if triton_impl:
        import dsv.kernels as kern
    timer = _timer(device, repeats)
    gen = torch.Generator(device=device).manual_seed(0)
    if peak is None and device == "cuda":
        peak = device_peak(torch.cuda.get_device_name())
    tol = CHECK_TOL[dtype_name]
    records: list[dict[str, Any]] = []

    def rand(*size: int, dt: torch.dtype = dtype) -> torch.Tensor:
        # drawn in the target dtype: an fp32 draw of the 128K prefill query (128 heads x 576) alone is 39 GB
        return torch.randn(*size, generator=gen, device=device, dtype=dt)

    def index_scores(qi: torch.Tensor, ki: torch.Tensor, wi: torch.Tensor, off: int) -> torch.Tensor:
        if triton_impl:
            return kern.indexer_scores(qi, ki, wi, q_offset=off)
        return ref.indexer_scores_reference(qi, ki, wi, off)

    def select(scores: torch.Tensor, K: int) -> torch.Tensor:
        return kern.topk(scores, K) if triton_impl else ref.select_topk_reference(scores, K)

    def prefill_selection(shape: BenchShape, B: int, L: int, K: int) -> torch.Tensor:
        # what the model attends over: each query's top-K keys by the indexer (random weights), in
        # query chunks whose fp32 scores fit SCORE_BYTES; int32 [B, L, K], -1 past the visible keys
        ki = rand(B, L, shape.index_dim)
        idx = torch.empty(B, L, K, dtype=torch.int32, device=device)
        step = query_chunk(B, L)
        for s0 in range(0, L, step):
            n = min(step, L - s0)
            qi = rand(B, n, shape.index_heads, shape.index_dim)
            wi = rand(B, n, shape.index_heads, dt=torch.float32)
            idx[:, s0 : s0 + n] = select(index_scores(qi, ki, wi, s0), K)
        return idx

    def measure(
        shape: BenchShape,
        L: int,
        B: int,
        op: str,
        impl: str,
        fn: Callable[[], object],
        flops: float,
        nbytes: float,
        queries: int,
        checker: Callable[[], tuple[float, str]] | None = None,
        sdpa: str | None = None,
    ) -> None:
        err = scope = None
        if check and checker is not None:  # before timing: its tensors are freed before the peak is read
            err, scope = checker()
            scope = None if err is None else scope
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # freed blocks of the previous op must not fragment this one's
            torch.cuda.reset_peak_memory_stats()
        with _sdpa_only(sdpa) if sdpa else contextlib.nullcontext():
            ms = timer(fn)
        peak_mib = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
        tflops = flops / (ms * 1e-3) / 1e12 if flops else None
        gbps = nbytes / (ms * 1e-3) / 1e9 if nbytes else None
        records.append(
            {
                "preset": shape.name, "context": L, "batch": B, "op": op, "impl": impl, "sdpa_backend": sdpa,
                "ms": ms, "tflops": tflops, "gbps": gbps,
                # the bf16 tensor-core peak: an fp32 run (IEEE fp32 dots) has no percentage against it
                "pct_peak_flops": 100 * tflops / peak.bf16_tflops if peak and tflops and dtype_name == "bf16" else None,
                "pct_peak_bw": 100 * gbps / (1e3 * peak.hbm_tbps) if peak and gbps else None,
                "peak_mib": peak_mib, "device": device, "dtype": dtype_name, "queries": queries,
                "max_err": err, "check": None if err is None else ("pass" if err <= tol else "FAIL"),
                "check_scope": scope,
            }
        )  # fmt: skip
        if progress:
            progress(f"{shape.name} L={L} B={B} {op} [{impl}] {ms:.2f} ms")

    elt = torch.finfo(dtype).bits // 8
    for shape in shapes:
        H, D, dv = shape.heads, shape.d_qk, shape.kv_lora_rank
        for L in contexts:
            B = batch
            K = min(shape.index_topk, L)
            sm = D**-0.5
            if "indexer" in ops or "topk" in ops:
                # the last `nq` queries of the context (all of it up to SCORE_BYTES of fp32 scores): a full
                # 128K x 128K score matrix is 64 GiB, more than the benchmark should hold on an 80 GB card;
                # the last queries see the most keys, so this is the expensive end of the prefill
                nq = query_chunk(B, L)
                qi, ki = rand(B, nq, shape.index_heads, shape.index_dim), rand(B, L, shape.index_dim)
                wi = rand(B, nq, shape.index_heads, dt=torch.float32)
                off = L - nq
                idx_fn = lambda: index_scores(qi, ki, wi, off)  # noqa: E731
                scores = idx_fn()
                m = min(CHECK_QUERIES, nq)  # the last m queries: the reference's [m, H, L] block stays small
                scope = "all" if m == nq else f"last {m} queries"
                if "indexer" in ops:
                    visible_pairs = nq * off + nq * (nq + 1) / 2  # causal (query, key) pairs computed
                    flops = 2 * B * visible_pairs * shape.index_heads * shape.index_dim

                    def check_ix() -> tuple[float, str]:
                        want = ref.indexer_scores_reference(qi[:, -m:], ki, wi[:, -m:], L - m)
                        return _rel_err(scores[:, -m:], want), scope

                    measure(
                        shape, L, B, "indexer", backend, idx_fn, flops,
                        (qi.numel() + ki.numel()) * elt + 4 * B * nq * L, nq, check_ix if triton_impl else None,
                    )  # fmt: skip
                del qi, ki, wi
                if "topk" in ops:
                    topk_fn = lambda: select(scores, K)  # noqa: E731

                    def check_tk() -> tuple[float, str]:
                        want = ref.select_topk_reference(scores[:, -m:], K)
                        return _pick_mismatch(topk_fn()[:, -m:], want), scope

                    measure(shape, L, B, "topk", backend, topk_fn, 0.0, 4 * scores.numel(), nq,
                            check_tk if triton_impl else None)  # fmt: skip
                del scores
            if "sparse_prefill" in ops:
                idx = prefill_selection(shape, B, L, K)
                q, kv = rand(B, L, H, D), rand(B, L, D)
                sp_fn = (lambda: kern.sparse_mla(q, kv, idx, sm_scale=sm, d_v=dv)) if triton_impl else (lambda: ref.sparse_mla_reference(q, kv, idx, sm, dv))  # fmt: skip
                rows = _edge_queries(L, device)

                def check_sp() -> tuple[float, str]:
                    out = sp_fn()[0][:, rows]
                    want = ref.sparse_mla_reference(q[:, rows], kv, idx[:, rows], sm, dv)[0]
                    scope = "all" if len(rows) == L else f"first and last {len(rows) // 2} queries"
                    return _rel_err(out, want), scope

                flops = 2 * H * int((idx >= 0).sum()) * (D + dv)  # the valid picks only
                measure(shape, L, B, "sparse_prefill", backend, sp_fn, flops, B * L * K * D * elt, L,
                        check_sp if triton_impl else None)  # fmt: skip
                del q, kv, idx
            if "dense_prefill" in ops:
                dqk = shape.nope_dim + shape.rope_dim
                qd, kd, vd = rand(B, H, L, dqk), rand(B, H, L, dqk), rand(B, H, L, shape.v_head_dim)
                dense = lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)  # noqa: E731
                sdpa, out = pick_sdpa_backend(dense)
                m, h = min(CHECK_QUERIES, L), min(2, H)  # the reference's fp32 [h, m, L] logits stay small
                err = _rel_err(out[:, :h, -m:], _attention_fp32(qd[:, :h, -m:], kd[:, :h], vd[:, :h], dqk**-0.5, L - m)) if check else None  # fmt: skip
                del out
                flops = 2 * B * H * L * L * (dqk + shape.v_head_dim) / 2
                measure(
                    shape, L, B, "dense_prefill", "sdpa", dense, flops,
                    (qd.numel() + kd.numel() + vd.numel()) * elt, L,
                    lambda: (err, "all" if (m, h) == (L, H) else f"last {m} queries, {h} heads"), sdpa,
                )  # fmt: skip
                del qd, kd, vd
            if "sparse_decode" in ops or "dense_decode" in ops:
                for Bd in decode_batches or [batch]:
                    q1, cache = rand(Bd, 1, H, D), rand(Bd, L, D)
                    if "sparse_decode" in ops:
                        # the new token (position L - 1, sees all L keys) picks its own top-K per sequence
                        qi1, ki1 = (
                            rand(Bd, 1, shape.index_heads, shape.index_dim),
                            rand(Bd, L, shape.index_dim),
                        )
                        idx1 = select(
                            index_scores(qi1, ki1, rand(Bd, 1, shape.index_heads, dt=torch.float32), L - 1), K
                        )
                        del qi1, ki1
                        dec_fn = (lambda: kern.sparse_mla(q1, cache, idx1, sm_scale=sm, d_v=dv)) if triton_impl else (lambda: ref.sparse_mla_reference(q1, cache, idx1, sm, dv))  # fmt: skip

                        def check_dec() -> tuple[float, str]:
                            want = ref.sparse_mla_reference(q1, cache, idx1, sm, dv)[0]
                            return _rel_err(dec_fn()[0], want), "all"

                        measure(
                            shape, L, Bd, "sparse_decode", backend, dec_fn, 2 * Bd * H * K * (D + dv),
                            Bd * K * D * elt, 1, check_dec if triton_impl else None,
                        )  # fmt: skip
                        del idx1
                    if "dense_decode" in ops:
                        # absorbed MQA decode as FlashMLA runs it: the heads are the queries of one shared
                        # latent "head", so nothing is repeated per head (enable_gqa on the math backend
                        # would copy the 128K cache 128 times) and no mask is needed (the token sees all L)
                        qt, kt, vt = q1.view(Bd, 1, H, D), cache.unsqueeze(1), cache[..., :dv].unsqueeze(1)
                        dense_dec = lambda: F.scaled_dot_product_attention(qt, kt, vt, scale=sm)  # noqa: E731
                        sdpa, out = pick_sdpa_backend(dense_dec)
                        b = min(2, Bd)  # fp32 logits of 2 sequences x 128 heads x 128K keys: 128 MiB
                        err = (
                            _rel_err(out[:b], _attention_fp32(qt[:b], kt[:b], vt[:b], sm)) if check else None
                        )
                        del out
                        measure(
                            shape, L, Bd, "dense_decode", "sdpa", dense_dec, 2 * Bd * H * L * (D + dv),
                            Bd * L * D * elt, 1, lambda: (err, "all" if b == Bd else f"first {b} sequences"), sdpa,
                        )  # fmt: skip
                    del q1, cache
    for r in records:  # speed-up over the dense baseline measured in the same run
        base = {"sparse_prefill": "dense_prefill", "sparse_decode": "dense_decode"}.get(r["op"])
        match = [x for x in records if base and x["op"] == base
                 and (x["preset"], x["context"], x["batch"]) == (r["preset"], r["context"], r["batch"])]  # fmt: skip
        r["speedup_vs_dense"] = match[0]["ms"] / r["ms"] if match else None
    return records


SCORE_BYTES = 8 << 30  # fp32 indexer scores the benchmark holds at once (8 GiB)


def query_chunk(batch: int, context: int) -> int:
    """Queries whose ``[batch, queries, context]`` fp32 scores fit in ``SCORE_BYTES`` (all up to 32K context)."""
    return max(1, min(context, SCORE_BYTES // (4 * batch * context)))


COLUMNS = ("preset", "context", "batch", "queries", "op", "impl", "ms", "TFLOP/s", "% peak", "GB/s", "% BW",
           "peak MiB", "vs dense", "max err", "check")  # fmt: skip
_LEFT = ("preset", "op", "impl", "check")


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table_cells(r: dict[str, Any]) -> list[str]:
    """One record as the cells of :data:`COLUMNS` (the rich table and the Markdown file alike)."""
    impl = r["impl"] + (f" ({r['sdpa_backend'].split('_')[0].lower()})" if r.get("sdpa_backend") else "")
    return [
        r["preset"], str(r["context"]), str(r["batch"]), str(r["queries"]), r["op"], impl, _fmt(r["ms"], ".3f"),
        _fmt(r["tflops"], ".2f"), _fmt(r["pct_peak_flops"], ".1f"), _fmt(r["gbps"], ".1f"), _fmt(r["pct_peak_bw"], ".1f"),
        _fmt(r["peak_mib"], ".0f"), _fmt(r["speedup_vs_dense"], ".2f") + ("x" if r["speedup_vs_dense"] else ""),
        _fmt(r["max_err"], ".1e"), r["check"] or "-",
    ]  # fmt: skip


def _title(meta: dict[str, Any]) -> str:
    peak = meta.get("peak")
    against = (
        f"; peak {peak['name']}: {peak['bf16_tflops']:g} TFLOP/s bf16, {peak['hbm_tbps']:g} TB/s"
        if peak
        else ""
    )
    return (
        f"dsv bench kernels ({meta.get('device_name') or meta['device']}, {meta['dtype']}, "
        f"median of {meta['repeats']}{against})"
    )


def markdown_table(data: dict[str, Any]) -> str:
    """``kernels_bench.json``'s content (``meta`` and ``records``) as a Markdown section."""
    lines = [f"### {_title(data['meta'])}", "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---" if c in _LEFT else "---:" for c in COLUMNS) + "|"]  # fmt: skip
    lines += ["| " + " | ".join(table_cells(r)) + " |" for r in data["records"]]
    failed = [r for r in data["records"] if r["check"] == "FAIL"]
    if failed:
        lines += [
            "",
            f"**{len(failed)} check(s) failed** (max err over {CHECK_TOL[data['meta']['dtype']]:g}).",
        ]
    return "\n".join(lines) + "\n"


def _plot(records: list[dict[str, Any]], path: Path) -> None:

    from dsv.core.plot import pyplot, save_png

    plt = pyplot()
    if plt is None:
        print("matplotlib not installed: no plot written")
        return

    presets = sorted({r["preset"] for r in records})
    fig, axes = plt.subplots(1, len(presets), figsize=(6 * len(presets), 4), squeeze=False)
    for ax, name in zip(axes[0], presets, strict=True):
        for op in ("sparse_prefill", "dense_prefill", "sparse_decode", "dense_decode", "indexer"):
            for b in sorted({r["batch"] for r in records if r["preset"] == name and r["op"] == op}):
                pts = sorted(
                    (r["context"], r["ms"])
                    for r in records
                    if r["preset"] == name and r["op"] == op and r["batch"] == b
                )
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{op} (batch {b})")
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="context length",
            ylabel="ms (median)",
            title=f"{name} ({records[0]['device']})",
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=110)


def _fail(msg: str, code: int = 2) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise typer.Exit(code)


def _int_list(flag: str, text: str) -> list[int]:
    try:
        values = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        _fail(f"{flag} must be comma-separated integers, got {text!r}")
    if any(v < 1 for v in values):
        _fail(f"{flag} must be positive")
    return values


def bench_app(
    preset: str = typer.Option(
        "small", help="Comma-separated dsv.core presets: small, v32 (real V3.2 shapes)."
    ),
    contexts: str = typer.Option(
        "", help="Comma-separated context lengths (default: 4K..128K on CUDA, 512..2048 on CPU)."
    ),
    batch: int = typer.Option(1, min=1, help="Sequences per prefill batch."),
    batches: str = typer.Option(
        "",
        help="Comma-separated decode batch sizes (concurrent sequences; default: 1,64 on CUDA, --batch on CPU).",
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    backend: str = typer.Option("auto", help="auto (triton on CUDA, torch on CPU), triton or torch."),
    dtype: str = typer.Option("bf16", help="bf16 or fp32."),
    ops: str = typer.Option(
        "",
        help="Comma-separated subset of: indexer, topk, sparse_prefill, dense_prefill, sparse_decode, dense_decode.",
    ),
    repeats: int = typer.Option(5, min=1, help="Timed runs per measurement (median reported)."),
    check: bool = typer.Option(True, help="Compare each timed kernel once with its torch reference."),
    out: Path = typer.Option(
        Path("bench-out/kernels"), help="Directory for kernels_bench.json, .md and .png."
    ),
) -> None:
    """DSA kernels (indexer, top-k, sparse MLA prefill/decode) vs. dense SDPA across context lengths."""
    # every flag is checked before torch is imported, so a typo fails in well under a second
    if device not in ("auto", "cpu", "cuda"):
        _fail(f"--device must be auto, cpu or cuda, got {device!r}")
    if backend not in ("auto", "torch", "triton"):
        _fail(f"--backend must be auto, torch or triton, got {backend!r}")
    if dtype not in ("bf16", "fp32"):
        _fail(f"--dtype must be bf16 or fp32, got {dtype!r}")
    chosen_ops = tuple(o.strip() for o in ops.split(",") if o.strip()) or ALL_OPS
    if bad := [o for o in chosen_ops if o not in ALL_OPS]:
        _fail(f"unknown --ops {', '.join(bad)}; choose from {', '.join(ALL_OPS)}")
    ctx = _int_list("--contexts", contexts)
    decode_batches = _int_list("--batches", batches)

    import torch
    from rich.console import Console
    from rich.table import Table

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        _fail("--device cuda but no CUDA device is visible; use --device cpu", 1)
    if backend == "auto":
        backend = "triton" if device == "cuda" else "torch"
    if backend == "triton" and device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before dsv.kernels imports triton
    ctx = ctx or ([4096, 8192, 16384, 32768, 65536, 131072] if device == "cuda" else [512, 1024, 2048])
    decode_batches = decode_batches or ([1, 64] if device == "cuda" else [batch])
    try:
        shapes = [BenchShape.from_preset(p.strip()) for p in preset.split(",") if p.strip()]
    except (KeyError, ValueError) as exc:
        _fail(f"unknown --preset {preset!r} ({exc}); use small, v32 or a comma-separated list")

    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = device_peak(device_name) if device == "cuda" else None
    console = Console()
    with console.status("benchmarking...") as status:
        records = run_benchmarks(
            shapes=shapes, contexts=ctx, batch=batch, device=device, backend=backend, repeats=repeats,
            dtype_name=dtype, ops=chosen_ops, progress=lambda m: status.update(m),
            decode_batches=decode_batches, check=check, peak=peak,
        )  # fmt: skip
    meta = {"device": device, "device_name": device_name, "peak": asdict(peak) if peak else None,
            "backend": backend, "dtype": dtype, "batch": batch, "decode_batches": decode_batches,
            "repeats": repeats, "check_tol": CHECK_TOL[dtype], "shapes": [asdict(s) for s in shapes],
            "torch": torch.__version__}  # fmt: skip
    table = Table(title=_title(meta))
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in _LEFT else "right")
    for r in records:
        table.add_row(*table_cells(r))
    console.print(table)
    from dsv.core.checkpoint import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "records": records}
    atomic_write_bytes(out / "kernels_bench.json", json.dumps(data, indent=2).encode())
    atomic_write_bytes(out / "kernels_bench.md", markdown_table(data).encode())
    _plot(records, out / "kernels_bench.png")
    console.print(f"wrote {out / 'kernels_bench.json'}, kernels_bench.md and kernels_bench.png")
    # the run fails on a dsv kernel only: a baseline's error (SDPA in bf16 against fp32 maths) is shown, not fatal
    if failed := [r for r in records if r["check"] == "FAIL" and r["impl"] != "sdpa"]:
        _fail(
            f"{len(failed)} kernel output(s) differ from the torch reference: "
            + ", ".join(
                f"{r['op']} L={r['context']} B={r['batch']} (max err {r['max_err']:.2e})" for r in failed
            ),
            1,
        )
