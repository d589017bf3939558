"""``dsv bench kernels`` runs end to end (torch path on CPU at a tiny size), names the SDPA backend it
timed, checks every timed kernel against its torch reference (and fails a wrong one), relates
throughput to the device's peak, and rejects bad flags.

Run: ``pytest kernels/tests/test_kernels_bench.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dsv.kernels
from dsv.core import attention as ref
from dsv.kernels.bench import (
    CHECK_TOL,
    BenchShape,
    DevicePeak,
    device_peak,
    pick_sdpa_backend,
    run_benchmarks,
)

# DSV_KERNELS_TEST_DEVICE=cuda (tools/gpu_check.sh): the Triton rows run compiled on the GPU; the torch
# rows and the CLI stay on the CPU, where their SDPA backend is known
DEVICE = "cuda" if os.environ.get("DSV_KERNELS_TEST_DEVICE") == "cuda" else "cpu"
ALL = {"indexer", "topk", "sparse_prefill", "dense_prefill", "sparse_decode", "dense_decode"}
# smaller than the tiny preset: the interpreter's cost grows with the number of programs
MINI = BenchShape(name="mini", heads=2, kv_lora_rank=16, rope_dim=8, nope_dim=8, v_head_dim=8, index_heads=2,
                  index_dim=16, index_topk=8)  # fmt: skip


def test_run_benchmarks_records_every_op_with_dense_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    # scores budget for 16 of the 48 queries: the long-context path (last queries only) runs
    monkeypatch.setattr("dsv.kernels.bench.SCORE_BYTES", 4 * 2 * 48 * 16)
    shape = BenchShape.from_preset("tiny")
    records = run_benchmarks(
        shapes=[shape], contexts=[48], batch=2, device="cpu", backend="torch", repeats=1, dtype_name="fp32",
        decode_batches=[1, 3],
    )  # fmt: skip
    assert [(r["op"], r["batch"]) for r in records] == [
        ("indexer", 2), ("topk", 2), ("sparse_prefill", 2), ("dense_prefill", 2),
        ("sparse_decode", 1), ("dense_decode", 1), ("sparse_decode", 3), ("dense_decode", 3),
    ]  # fmt: skip
    assert all(r["ms"] > 0 for r in records)
    assert {r["op"]: r["queries"] for r in records if r["op"] in ("indexer", "topk")} == {
        "indexer": 16,
        "topk": 16,
    }
    assert all(r["queries"] == 48 for r in records if r["op"] in ("sparse_prefill", "dense_prefill"))
    assert all(r["queries"] == 1 for r in records if "decode" in r["op"])
    sparse = next(r for r in records if r["op"] == "sparse_prefill")
    dense = next(r for r in records if r["op"] == "dense_prefill")
    assert sparse["speedup_vs_dense"] == pytest.approx(dense["ms"] / sparse["ms"])
    for b in (1, 3):  # each decode batch against the dense decode of the same batch
        sd, dd = (next(r for r in records if r["op"] == op and r["batch"] == b) for op in ("sparse_decode", "dense_decode"))  # fmt: skip
        assert sd["speedup_vs_dense"] == pytest.approx(dd["ms"] / sd["ms"])
    # the torch rows are the references themselves: nothing to check; SDPA is checked against fp32 math
    assert all(r["check"] is None and r["max_err"] is None for r in records if r["impl"] == "torch")
    sdpa = [r for r in records if r["impl"] == "sdpa"]
    assert all(r["check"] == "pass" and r["max_err"] < 1e-5 and r["sdpa_backend"] == "MATH" for r in sdpa)
    assert all(r["pct_peak_flops"] is None and r["pct_peak_bw"] is None for r in records)  # a CPU: no peak


def test_sparse_prefill_attends_over_the_indexer_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    # the picks come from indexer scores -> top-k (not the most recent keys): capture what sparse MLA sees
    seen: list[torch.Tensor] = []

    def spy(q: torch.Tensor, kv: torch.Tensor, idx: torch.Tensor, sm_scale: float, d_v: int):  # type: ignore[no-untyped-def]
        seen.append(idx.clone())
        return real(q, kv, idx, sm_scale, d_v)

    real = ref.sparse_mla_reference
    monkeypatch.setattr(ref, "sparse_mla_reference", spy)
    L, K = 40, MINI.index_topk
    run_benchmarks(shapes=[MINI], contexts=[L], batch=1, device="cpu", backend="torch", repeats=1,
                   ops=("sparse_prefill", "sparse_decode"), dtype_name="fp32")  # fmt: skip
    prefill, decode = seen[0], seen[-1]
    assert prefill.shape == (1, L, K) and decode.shape == (1, 1, K)
    pos = torch.arange(L, device="cpu").view(1, L, 1)
    # every visible key up to K, -1 for the rest (a set: -1 may sit anywhere in the row)
    assert torch.equal((prefill >= 0).sum(-1), (pos.squeeze(-1) + 1).clamp_max(K))
    assert bool((prefill <= pos).all())  # causal
    recent = (pos - torch.arange(K, device="cpu").view(1, 1, K)).clamp_min(-1)
    assert not torch.equal(prefill.sort(-1).values, recent.sort(-1).values)  # not simply the latest K keys
    assert len(set(decode.flatten().tolist())) == K and int(decode.min()) >= 0


def test_triton_rows_are_checked_against_the_references() -> None:
    records = run_benchmarks(
        shapes=[MINI], contexts=[24], batch=1, device=DEVICE, backend="triton", repeats=1, dtype_name="fp32",
        ops=("indexer", "topk", "sparse_prefill", "sparse_decode"),
    )  # fmt: skip
    assert {r["op"] for r in records} == {"indexer", "topk", "sparse_prefill", "sparse_decode"}
    for r in records:
        assert r["check"] == "pass" and r["max_err"] <= CHECK_TOL["fp32"], r
    scopes = {r["op"]: r["check_scope"] for r in records}
    assert scopes["sparse_prefill"] == "first and last 8 queries" and scopes["sparse_decode"] == "all"


def _wrong_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """dsv.kernels' entry points replaced by the references, each with one deliberate error."""

    def indexer(q, k, w, *, q_offset=0):  # type: ignore[no-untyped-def]
        out = ref.indexer_scores_reference(q, k, w, q_offset)
        return out.where(torch.isinf(out), out * 1.1)  # 10% off

    def topk(scores, k):  # type: ignore[no-untyped-def]
        picked = ref.select_topk_reference(scores, k)
        return picked.where(picked < 0, (picked + 1) % scores.shape[-1])  # every pick one key off

    def sparse_mla(q, kv, idx, *, sm_scale, d_v):  # type: ignore[no-untyped-def]
        out, lse = ref.sparse_mla_reference(q, kv, idx, sm_scale, d_v)
        return out + 0.5 * out.abs().amax(), lse

    for name, fn in (("indexer_scores", indexer), ("topk", topk), ("sparse_mla", sparse_mla)):
        monkeypatch.setattr(dsv.kernels, name, fn)


def test_a_wrong_kernel_fails_its_check(monkeypatch: pytest.MonkeyPatch) -> None:
    _wrong_kernels(monkeypatch)
    records = run_benchmarks(
        shapes=[MINI], contexts=[24], batch=1, device="cpu", backend="triton", repeats=1, dtype_name="fp32",
        ops=("indexer", "topk", "sparse_prefill", "sparse_decode"),
    )  # fmt: skip
    assert {r["op"]: r["check"] for r in records} == dict.fromkeys(("indexer", "topk", "sparse_prefill", "sparse_decode"), "FAIL")  # fmt: skip
    assert next(r for r in records if r["op"] == "indexer")["max_err"] == pytest.approx(0.1, rel=1e-4)


def test_percent_of_peak_uses_the_bf16_peak_and_bandwidth() -> None:
    peak = DevicePeak(name="test", bf16_tflops=1e-6, hbm_tbps=1e-5)
    common = dict(shapes=[MINI], contexts=[24], batch=1, device="cpu", backend="torch", repeats=1,
                  ops=("sparse_prefill", "topk"), check=False, peak=peak)  # fmt: skip
    for r in run_benchmarks(dtype_name="bf16", **common):
        assert r["pct_peak_bw"] == pytest.approx(100 * r["gbps"] / 1e-2)
        if r["op"] == "sparse_prefill":
            assert r["pct_peak_flops"] == pytest.approx(100 * r["tflops"] / 1e-6)
        else:
            assert r["tflops"] is None and r["pct_peak_flops"] is None
    # an fp32 run does IEEE fp32 dots: the bf16 tensor-core peak is not its peak, so no FLOP percentage
    assert all(
        r["pct_peak_flops"] is None and r["pct_peak_bw"] for r in run_benchmarks(dtype_name="fp32", **common)
    )


def test_device_peak_knows_only_the_listed_parts() -> None:
    assert device_peak("NVIDIA H100 80GB HBM3").name == "H100 SXM"  # type: ignore[union-attr]
    assert device_peak("NVIDIA H100 SXM5 80GB").name == "H100 SXM"  # type: ignore[union-attr]
    assert device_peak("NVIDIA H200").hbm_tbps == 4.8  # type: ignore[union-attr]
    assert device_peak("NVIDIA H800").hbm_tbps == 3.35  # type: ignore[union-attr]
    for other in ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA A100-SXM4-80GB", "cpu"):
        assert device_peak(other) is None, other


def test_pick_sdpa_backend_reports_the_first_backend_that_runs() -> None:
    q, v = torch.randn(1, 2, 8, 16, device="cpu"), torch.randn(1, 2, 8, 8, device="cpu")
    name, out = pick_sdpa_backend(lambda: F.scaled_dot_product_attention(q, q, q, is_causal=True))
    assert name == "FLASH_ATTENTION"  # torch's CPU flash kernel takes equal q/k/v head dims
    name, out = pick_sdpa_backend(lambda: F.scaled_dot_product_attention(q, q, v, is_causal=True))
    assert name == "MATH" and out.shape == (1, 2, 8, 8)  # v 8 != qk 16: only the math backend runs it

    def never() -> torch.Tensor:
        raise RuntimeError("No available kernel. Aborting execution.")

    with pytest.raises(
        RuntimeError, match="no SDPA backend runs these shapes: FLASH_ATTENTION: No available"
    ):
        pick_sdpa_backend(never)


def test_bench_cli_writes_json_markdown_and_png(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "from dsv.cli.main import main; main()", "bench", "kernels", "--device", "cpu",
           "--preset", "tiny", "--contexts", "32", "--batches", "1,2", "--repeats", "1", "--dtype", "fp32",
           "--out", str(tmp_path)]  # fmt: skip
    pytest.importorskip("dsv.cli.main")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    data = json.loads((tmp_path / "kernels_bench.json").read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["decode_batches"] == [1, 2]
    assert len(data["records"]) == 8 and {r["op"] for r in data["records"]} == ALL
    md = (tmp_path / "kernels_bench.md").read_text()
    assert "| preset | context | batch | queries | op | impl | ms | TFLOP/s | % peak | GB/s | % BW |" in md
    assert "| tiny | 32 | 1 | 32 | dense_prefill | sdpa (math) |" in md and md.count(" | pass |") == 3
    assert (tmp_path / "kernels_bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _app():  # type: ignore[no-untyped-def]
    import typer

    from dsv.kernels.bench import bench_app

    app = typer.Typer()
    app.command()(bench_app)
    return app


def test_bench_cli_exits_1_when_a_check_fails(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    _wrong_kernels(monkeypatch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # what --backend triton --device cpu sets, undone afterwards
    done = CliRunner().invoke(_app(), ["--device", "cpu", "--backend", "triton", "--preset", "tiny", "--contexts",
                                       "32", "--repeats", "1", "--dtype", "fp32", "--ops", "sparse_decode",
                                       "--out", str(tmp_path)])  # fmt: skip
    assert done.exit_code == 1, done.output
    assert done.stderr.startswith(
        "error: 1 kernel output(s) differ from the torch reference: sparse_decode L=32 B=1"
    )
    assert "**1 check(s) failed**" in (tmp_path / "kernels_bench.md").read_text()


def test_bench_bad_flags_fail_in_one_line() -> None:
    # in-process (the CLI path itself is covered above): flags are checked before torch is imported
    from typer.testing import CliRunner

    for flags, message in (
        (["--device", "gpu"], "error: --device must be auto, cpu or cuda, got 'gpu'"),
        (["--ops", "sparse_prefill,flash"], "error: unknown --ops flash; choose from indexer, topk, "
         "sparse_prefill, dense_prefill, sparse_decode, dense_decode"),
        (["--contexts", "4k"], "error: --contexts must be comma-separated integers, got '4k'"),
        (["--batches", "1,x"], "error: --batches must be comma-separated integers, got '1,x'"),
        (["--batches", "0"], "error: --batches must be positive"),
    ):  # fmt: skip
        done = CliRunner().invoke(_app(), flags)
        assert done.exit_code == 2 and done.stderr.strip() == message, (flags, done.output)
