"""Every kernel compiles for a GPU (sm_90) without one, within Hopper's limits, at the V3.2 shapes.

The interpreter runs kernel bodies as Python, so code only the compiler rejects (a reassigned
constexpr, a ``tl.dot`` below 16) passes every other test here, and nothing there sees registers,
spills or which tensor-core instructions a kernel ends up with. This runs ``python -m
dsv.kernels.cuda_compile --json`` once, in a subprocess without ``TRITON_INTERPRET`` and with an empty
Triton cache (a real compile; about 15-25 s for the whole table on one core), and checks every row:
no spill stores, at most 255 registers, at most 227 KiB of shared memory, the ``ptxas -v`` rerun
describing the same cubin Triton built (equal register counts), and every sparse attention kernel with
matrix products (forward: prefill, split-KV decode, FP8 cache; backward: dq, dkv, dkv deterministic)
doing them all on Hopper's wgmma (``wgmma.mma_async`` in the PTX, ``HGMMA``/``QGMMA`` in the SASS), not
the warp-level ``mma.sync``.

Run: ``pytest kernels/tests/test_kernels_cuda_compile.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import triton

from dsv.kernels.cuda_compile import MAX_REGISTERS, MAX_SHARED_BYTES, ptx_mma_kind, sass_mma_kinds

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
needs_ptxas = pytest.mark.skipif(not PTXAS.exists(), reason="this triton build ships no ptxas")
# One worker for the module (pytest -n with --dist loadgroup): the table fixture compiles every kernel
# (about a minute of one core), and each worker that ran a test of it would compile it again.
pytestmark = pytest.mark.xdist_group("cuda_compile")


def _compile(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(tmp), "TRITON_DEFAULT_FP_FUSION": "1"}  # a fresh, real compile
    cmd = [sys.executable, "-m", "dsv.kernels.cuda_compile", "--arch", "90", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The whole compile table at V3.2 shapes, compiled once for this module."""
    done = _compile(tmp_path_factory.mktemp("triton-cache"), "--json")
    # exit 1: a kernel did not compile; its row says why and the tests below fail on it by name
    assert done.returncode in (0, 1) and done.stdout.startswith("{"), done.stderr[-4000:]
    return json.loads(done.stdout)


@needs_ptxas
def test_every_kernel_is_in_the_table(table: dict[str, Any]) -> None:
    from dsv.kernels.cuda_compile import _specs

    assert [r["name"] for r in table["kernels"]] == [label for label, _, _ in _specs()]
    assert table["arch"] == 90 and table["ptxas"]
    compiled = [r for r in table["kernels"] if not r["error"]]
    assert all(r["sass_mma"] is not None and r["cubin_registers"] is not None for r in compiled), (
        "cuobjdump did not read a cubin"
    )


@needs_ptxas
def test_every_kernel_fits_hopper_without_spilling(table: dict[str, Any]) -> None:
    bad = []
    for r in table["kernels"]:
        why = [f"does not compile: {r['error']}"] if r["error"] else []
        if r["spill_bytes"] != 0:
            why.append(f"spill {r['spill_bytes']} B/thread")
        if r["registers"] is None or r["registers"] > MAX_REGISTERS:
            why.append(f"{r['registers']} registers")
        if r["shared_bytes"] > MAX_SHARED_BYTES:
            why.append(f"{r['shared_bytes'] / 1024:.1f} KiB shared")
        if why:
            bad.append(f"{r['name']} ({r['config']}): {', '.join(why)}")
    assert not bad, "kernels over the sm_90 limits:\n" + "\n".join(bad)


@needs_ptxas
def test_ptxas_report_describes_tritons_own_cubin(table: dict[str, Any]) -> None:
    # the register and spill columns come from a ptxas rerun; equal register counts say that it ran with
    # Triton's flags (a different register allocator setting moves both registers and spills)
    bad = [f"{r['name']}: rerun {r['registers']}, cubin {r['cubin_registers']}" for r in table["kernels"]
           if not r["error"] and r["registers"] != r["cubin_registers"]]  # fmt: skip
    assert not bad, "\n".join(bad)


@needs_ptxas
def test_sparse_attention_kernels_use_wgmma(table: dict[str, Any]) -> None:
    # Every sparse_mla kernel with matrix products: prefill, split-KV decode, the FP8-cache decode and
    # both backward kernels (dq, dkv, dkv deterministic). The split-KV combine and the ordered dkv
    # reduction are element-wise sums; they stay out only while they have no products at all.
    elementwise = {"sparse_mla split-KV combine", "sparse_mla bwd ordered dkv reduce"}
    sparse = [r for r in table["kernels"] if r["name"].startswith("sparse_mla")]
    rows = [r for r in sparse if r["name"] not in elementwise]
    assert {"sparse_mla fwd", "sparse_mla fwd split-KV partial", "sparse_mla bwd dq", "sparse_mla bwd dkv",
            "sparse_mla bwd dkv (deterministic)"} <= {r["name"] for r in rows}, rows  # fmt: skip
    bad = [f"{r['name']} ({r['config']}): " + (r["error"] or f"PTX {r['mma']}, SASS {r['sass_mma']}") for r in rows
           if r["error"] or r["mma"] != "wgmma" or not r["uses_wgmma"] or "GMMA" not in (r["sass_mma"] or "")]  # fmt: skip
    bad += [f"{r['name']}: PTX {r['mma']} (products here need wgmma too)" for r in sparse
            if r["name"] in elementwise and r["mma"] != "none"]  # fmt: skip
    assert not bad, "sparse attention kernels without wgmma:\n" + "\n".join(bad)


@needs_ptxas
def test_markdown_table_row(tmp_path: Path) -> None:
    done = _compile(tmp_path, "--only", "kl_row")
    assert done.returncode == 0, done.stderr[-4000:]
    header, _, row = done.stdout.splitlines()
    assert header.split("|")[1:-1][5:8] == [" stack B ", " mma (PTX) ", " SASS mma "]
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[0] == "indexer_kl kl_row" and cells[4] == "0" and cells[6:8] == ["none", "none"]


def test_mma_kinds_are_read_from_ptx_and_sass() -> None:
    wgmma = "wgmma.fence.sync.aligned;\n\twgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1}, ..."
    warp = "\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, ..."
    assert ptx_mma_kind(wgmma) == "wgmma"
    assert ptx_mma_kind(warp) == "mma.sync"
    assert ptx_mma_kind(wgmma + "\n" + warp) == "wgmma+mma.sync"
    assert ptx_mma_kind("\tfma.rn.f32 %f1, %f2, %f3, %f4;") == "none"
    sass = """
        /*0050*/                   HFMA2.MMA R13, -RZ, RZ, 0, 0 ;
        /*0a10*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0b20*/              @P0  QGMMA.64x64x32.F32.E4M3.E4M3 R88, gdesc[UR8], R88 ;
        /*0c30*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
    """
    assert sass_mma_kinds(sass) == "HGMMA+HMMA+QGMMA"
    assert sass_mma_kinds(sass.splitlines()[1]) == "none"  # HFMA2.MMA is an FMA, not a matrix product


def test_a_kernel_that_does_not_compile_gets_a_row_saying_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # in-process, no compiler: the spec list is one kernel whose compile raises as Triton's errors do
    from dsv.kernels import cuda_compile as cc

    def refuse(*args: object, **kwargs: object) -> None:
        raise ValueError("at 17:8:\n        _collect(x_row, o_row)\n        ^\nunsupported tensor index")

    monkeypatch.setattr(cc, "_specs", lambda: [("topk broken", None, {"num_warps": 8})])
    monkeypatch.setattr(cc, "_triton_compile", refuse)
    [row] = cc.compile_all()
    assert row.error is not None and row.error.splitlines()[0] == "ValueError: unsupported tensor index"
    assert row.problems() == ["does not compile: ValueError: unsupported tensor index"]
    assert row.config == "warps=8, stages=3" and row.registers is None
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cc.main(["--json"]) == 1  # the table is still printed, the exit code says a kernel failed
    doc = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["problems"]) for r in doc["kernels"]] == [("topk broken", row.problems())]
