"""DSA on the CPU as one compiled call per layer: indexer head-sum, causal mask, top-k and sparse
attention over the selected latent rows (``dsa.c`` beside this file).

Decode on a CPU is bound by per-op overhead, not arithmetic: the torch chain
``indexer_scores -> select_topk -> sparse_mla`` is about 25 ops per layer of a few microseconds of
work each. :func:`sparse_attend` keeps the ``q . k`` product of the indexer in one torch ``bmm``
(a GEMM is what torch does best) and does everything after it in C, one pass per query row.

The C file is compiled on first use with the system C compiler (``$CC``, else ``cc``, ``gcc`` or
``clang``; ``-O3 -march=native``) into ``$DSV_CACHE_DIR/kernels`` (default
``~/.cache/dsv/kernels``), keyed by the source, the compiler, its flags and the CPU, and loaded
with ctypes; the call releases the GIL. Without a compiler :func:`availability` says so and
dsv.core keeps the torch chain. fp32 only; inference only (no autograd).

Run the checks: ``pytest kernels/tests/test_cpu_dsa.py``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

__all__ = ["availability", "cache_dir", "select", "sparse_attend"]

_SOURCE = Path(__file__).with_name("dsa.c")
_FLAGS = ["-O3", "-fopenmp-simd", "-fPIC", "-shared", "-std=c11"]
_NATIVE = ["-march=native"]
_SYMBOL = "dsv_dsa_sparse_attend_f32"
_RAW_CHUNK_ELEMS = 1 << 18  # 1 MiB of fp32: one core's L2 on the machines measured


def cache_dir() -> Path:
    """Where compiled CPU kernels are kept: ``$DSV_CACHE_DIR/kernels``, else ``~/.cache/dsv/kernels``."""
    root = os.environ.get("DSV_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "dsv"
    )
    return Path(root) / "kernels"


def _compiler() -> str | None:
    env = os.environ.get("CC")
    if env:
        return shutil.which(env) or env
    return next((p for p in map(shutil.which, ("cc", "gcc", "clang")) if p), None)


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags (Linux), else the arch."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return platform.machine() + "\n".join(dict.fromkeys(keep))


def _build(cc: str, out: Path) -> str:
    """Compile the source to ``out`` atomically (temp file, then rename); '' or the compiler's error."""
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for extra in (_NATIVE, []):  # -march=native is not understood everywhere (some clang targets)
        fd, tmp = tempfile.mkstemp(prefix=out.stem + ".", suffix=".tmp.so", dir=out.parent)
        os.close(fd)
        cmd = [cc, *_FLAGS, *extra, "-o", tmp, str(_SOURCE), "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            done = None
            errors.append(f"{' '.join(cmd)}: {e}")
        if done is not None and done.returncode == 0:
            os.replace(tmp, out)  # concurrent builders each rename a complete file
            return ""
        if done is not None:
            errors.append(f"{' '.join(cmd)}: {done.stderr.strip()[-400:]}")
        Path(tmp).unlink(missing_ok=True)
    return "; ".join(errors)


@functools.lru_cache(maxsize=1)
def _library() -> tuple[ctypes.CDLL | None, str]:
    cc = _compiler()
    if cc is None:
        return None, "no C compiler found (set CC, or install cc/gcc/clang) to build the CPU DSA kernel"
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([source, cc.encode(), " ".join(_FLAGS + _NATIVE).encode(), _cpu_id().encode()])
    )
    name = f"dsa-{key.hexdigest()[:16]}.so"
    path = cache_dir() / name
    if not path.exists():
        try:
            error = _build(cc, path)
        except OSError:  # an unwritable cache: build for this process only
            path = Path(tempfile.mkdtemp(prefix="dsv-kernels-")) / name
            error = _build(cc, path)
        if error:
            return None, f"the CPU DSA kernel did not compile: {error}"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"the CPU DSA kernel at {path} did not load: {e}"
    fn = getattr(lib, _SYMBOL)
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, p, p, p, p, i64, i64, *([i64] * 11), ctypes.c_float, p, p, p]
    fn.restype = ctypes.c_int
    return lib, f"compiled with {cc} ({path})"


def availability() -> tuple[bool, str]:
    """Whether the CPU DSA kernel is built and loadable here (building it on first call), and why."""
    lib, why = _library()
    return lib is not None, why


def select(
    iq: torch.Tensor, index_k: torch.Tensor, iw: torch.Tensor, q_offset: torch.Tensor | int, *, topk: int
) -> torch.Tensor:
    """The indexer's top-``topk`` keys per query, ``idx [B,S,K]`` int32 (``K = min(topk, T)``, order
    unspecified, ``-1`` past a query's visible count): ``select_topk(indexer_scores(...), topk)``,
    with its tie rule (among equal scores the lower key index first).

    For models whose attention is large enough that torch's blocked attention beats a per-row loop
    (see :data:`dsv.core.attention.FUSED_ATTEND_MAX`), the selection alone is still one call.
    """
    return _run(iq, index_k, iw, q_offset, None, None, topk=topk, sm_scale=1.0, d_v=0)[2]


def sparse_attend(
    iq: torch.Tensor,
    index_k: torch.Tensor,
    iw: torch.Tensor,
    q_offset: torch.Tensor | int,
    q: torch.Tensor,
    kv: torch.Tensor,
    *,
    topk: int,
    sm_scale: float,
    d_v: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Select and attend in one call: ``(out [B,S,H,d_v], lse [B,S,H], idx [B,S,K])``.

    Inputs as in :mod:`dsv.core.attention`: index queries ``iq [B,S,H_I,D_I]``, index keys
    ``index_k [B,T,D_I]``, head weights ``iw [B,S,H_I]``, ``q_offset [B]`` (int64), absorbed
    queries ``q [B,S,H,D]`` and latent rows ``kv [B,T,D]`` (rows may be strided views into a larger
    buffer; each row's ``D`` values contiguous). ``K = min(topk, T)``; ``idx`` lists each query's
    selection in no particular order, ``-1`` past its visible count. Equals
    ``sparse_mla(q, kv, select_topk(indexer_scores(iq, index_k, iw, q_offset), topk), ...)``.
    """
    out, lse, idx = _run(iq, index_k, iw, q_offset, q, kv, topk=topk, sm_scale=sm_scale, d_v=d_v)
    assert out is not None and lse is not None
    return out, lse, idx


def _run(
    iq: torch.Tensor,
    index_k: torch.Tensor,
    iw: torch.Tensor,
    q_offset: torch.Tensor | int,
    q: torch.Tensor | None,
    kv: torch.Tensor | None,
    *,
    topk: int,
    sm_scale: float,
    d_v: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Both entry points: check, then walk the queries in chunks; ``q is None``: selection only."""
    lib, why = _library()
    if lib is None:
        raise RuntimeError(why)
    B, S, HI, DI = iq.shape
    T = index_k.shape[1]
    tensors = {"iq": iq, "index_k": index_k, "iw": iw, "q": q, "kv": kv}
    for name, t in tensors.items():
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            raise TypeError(f"{name}: expected a float32 CPU tensor, got {t.dtype} on {t.device}")
    H, D = q.shape[2:] if q is not None else (0, 0)
    if (
        index_k.shape != (B, T, DI)
        or iw.shape != (B, S, HI)
        or (q is not None and q.shape[:2] != (B, S))
        or (kv is not None and kv.shape != (B, T, D))
    ):
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in tensors.items() if t is not None)
        raise ValueError(
            f"shapes do not agree: {shapes} (expected iq [B,S,H_I,D_I], index_k [B,T,D_I], iw [B,S,H_I], "
            "q [B,S,H,D], kv [B,T,D])"
        )
    if kv is not None and kv.stride(2) != 1:
        raise ValueError(f"kv: each row's values must be contiguous, got strides {kv.stride()}")
    if q is not None and not 0 < d_v <= D:
        raise ValueError(f"d_v: expected 1..{D}, got {d_v}")
    K = min(topk, T)
    iw = iw.contiguous()
    if isinstance(q_offset, int):
        offsets = torch.full((B,), q_offset, dtype=torch.int64)
    else:
        offsets = q_offset.to(device="cpu", dtype=torch.int64).expand(B).contiguous()
    idx = torch.empty(B, S, K, dtype=torch.int32)
    out = lse = None
    if q is not None and kv is not None:
        q = q.contiguous()
        out, lse = torch.empty(B, S, H, d_v), torch.empty(B, S, H)
        attend = (q.data_ptr(), kv.data_ptr(), kv.stride(0), kv.stride(1), out.data_ptr(), lse.data_ptr())
    else:
        attend = (None, None, 0, 0, None, None)
    keys = index_k.transpose(1, 2)
    last = int(offsets.max()) if B else 0  # the furthest row's first query position
    # Queries in chunks whose q . k block [B, chunk, H_I, T] stays in cache while C reads it back
    # (one 16 MB block for a 4 x 256-query prefill chunk ran 1.4x slower than the torch chain).
    chunk = max(1, _RAW_CHUNK_ELEMS // (B * HI * T))
    for s0 in range(0, S, chunk):
        s1 = min(S, s0 + chunk)
        # Only the keys some query of the chunk sees: a prefill chunk's early queries see few.
        seen = max(1, min(T, last + s1))
        raw = torch.bmm(iq[:, s0:s1].reshape(B, (s1 - s0) * HI, DI), keys[:, :, :seen])  # (B, n*H_I, seen)
        status = lib.dsv_dsa_sparse_attend_f32(
            raw.data_ptr(), iw.data_ptr(), offsets.data_ptr(), *attend[:4],
            B, S, s0, s1, HI, T, seen, H, D, d_v, K, sm_scale, *attend[4:], idx.data_ptr(),
        )  # fmt: skip
        if status != 0:
            raise MemoryError("the CPU DSA kernel could not allocate its scratch buffers")
    return out, lse, idx
