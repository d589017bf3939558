"""FP8 linear layer: the Triton act-quant against its torch twin (bit for bit), the block-scaled GEMM
against dequantise-then-matmul, and :class:`Fp8Linear` in a model. Shapes are small and ragged (K and N
not multiples of 128, a row count below the tile) so partial groups and edge blocks are exercised.

Run: ``pytest kernels/tests/test_kernels_fp8_gemm.py`` (the conftest turns on Triton's interpreter).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import dsv.kernels as kern
from dsv.core.errors import CheckpointError
from dsv.core.fp8 import dequantize_fp8, is_quantized_name, quantize_fp8
from dsv.kernels.ops.fp8_gemm.reference import act_quant_reference, dequantize_act, fp8_gemm_reference


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_quant_matches_reference_bit_for_bit(dtype: torch.dtype, ue8m0: bool) -> None:
    x = (torch.randn(2, 3, 300) * torch.logspace(-3, 2, 300)).to(dtype)
    x[1, 2] = 0.0  # an all-zero row: the amax floor (1e-4) keeps its scale finite
    q, s = kern.act_quant(x, ue8m0=ue8m0)
    q_ref, s_ref = act_quant_reference(x, ue8m0=ue8m0)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.shape == (2, 3, 3) and s.dtype == torch.float32  # ceil(300 / 128) groups, the last of 44
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(q.float(), q_ref.float(), rtol=0, atol=0)
    assert s[1, 2].eq(2.0**-22 if ue8m0 else 1e-4 / 448).all()
    if ue8m0:
        assert torch.equal(s, torch.exp2(torch.log2(s).round()))
    # the round trip is within e4m3's half-ulp (2^-4 relative) of every value
    err = (dequantize_act(q, s) - x.float()).abs()
    assert (err <= x.float().abs() * 2**-4 + s.repeat_interleave(128, -1)[..., :300] * 2**-9).all()


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm_matches_dequantize_then_matmul(out_dtype: torch.dtype) -> None:
    M, N, K = 19, 200, 300  # 2 row tiles, N and K with partial 128-blocks
    w_q, w_s = quantize_fp8(torch.randn(N, K) * 0.05)
    a_q, a_s = act_quant_reference(torch.randn(M, K) * 3)
    got = kern.fp8_gemm(a_q, a_s, w_q, w_s, out_dtype=out_dtype)
    want = fp8_gemm_reference(a_q, a_s, w_q, w_s, out_dtype=torch.float32)
    assert got.shape == (M, N) and got.dtype == out_dtype
    tol = 1e-5 if out_dtype == torch.float32 else 8e-3  # summation order / one bf16 rounding
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())


def test_fp8_linear_is_close_to_the_full_precision_layer() -> None:
    x = torch.randn(2, 7, 256, dtype=torch.bfloat16)
    w = torch.randn(136, 256) * 0.02
    bias = torch.randn(136, dtype=torch.bfloat16)
    w_q, w_s = quantize_fp8(w)
    got = kern.fp8_linear(x, w_q, w_s, bias, ue8m0=True)
    a_q, a_s = act_quant_reference(x, ue8m0=True)
    exact = fp8_gemm_reference(a_q, a_s, w_q, w_s, out_dtype=torch.float32) + bias.float()
    assert got.shape == (2, 7, 136) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), exact, rtol=1e-2, atol=1e-2 * exact.abs().max().item())
    # and the whole FP8 path stays within a few percent of the unquantised layer
    full = x.float() @ w.T + bias.float()
    assert ((got.float() - full).norm() / full.norm()).item() < 0.06


def test_bad_arguments_are_named_before_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    w_q, w_s = quantize_fp8(torch.randn(200, 300))
    a_q, a_s = act_quant_reference(torch.randn(4, 300))
    with pytest.raises(
        ValueError, match=r"w_scale: expected shape \[ceil\(N/128\), ceil\(K/128\)\] = \(2, 3\)"
    ):
        kern.fp8_gemm(a_q, a_s, w_q, w_s[:1])
    with pytest.raises(TypeError, match="a_fp8: expected dtype in \\(float8_e4m3fn\\)"):
        kern.fp8_gemm(a_q.float(), a_s, w_q, w_s)
    with pytest.raises(ValueError, match=r"w_fp8: expected shape \[N, K\]"):
        kern.fp8_gemm(a_q, a_s, w_q[:, :256], w_s)
    with pytest.raises(ValueError, match=r"a_scale: expected shape"):
        kern.fp8_gemm(a_q, a_s[:, :2], w_q, w_s)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        kern.act_quant(torch.randn(4, 300, device="cpu"))


def test_fp8_linear_module_paths_and_errors() -> None:
    lin = torch.nn.Linear(300, 200, bias=True)
    fp8 = kern.Fp8Linear.from_linear(lin, backend="torch")
    x = torch.randn(3, 300)
    w = dequantize_fp8(fp8.qweight, fp8.weight_scale_inv, dtype=torch.float32)
    # the CPU path is exact with respect to the stored FP8 values
    torch.testing.assert_close(fp8(x), torch.nn.functional.linear(x, w, lin.bias), rtol=0, atol=0)
    torch.testing.assert_close(fp8.weight, w, rtol=0, atol=0)
    fp8.backend = "triton"
    torch.testing.assert_close(fp8(x), fp8_gemm_reference(*act_quant_reference(x), fp8.qweight,
                               fp8.weight_scale_inv, out_dtype=torch.float32) + lin.bias.detach(),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match=r"weight_scale_inv: a \(200, 300\) weight in 128x128 blocks needs"):
        kern.Fp8Linear(fp8.qweight, fp8.weight_scale_inv[:1])
    with pytest.raises(ValueError, match="backend: expected one of auto, triton, torch"):
        kern.Fp8Linear(fp8.qweight, fp8.weight_scale_inv, backend="cuda")


def test_quantize_linears_swaps_exactly_the_checkpoints_fp8_layers() -> None:
    from dsv.core.model import DSVForCausalLM
    from dsv.core.presets import preset

    torch.manual_seed(0)
    model = DSVForCausalLM(preset("tiny")).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    names = kern.quantize_linears(model, backend="torch")
    linear_names = {n for n, m in model.named_modules() if isinstance(m, kern.Fp8Linear)}
    assert set(names) == linear_names and names
    assert all(is_quantized_name(f"{n}.weight") for n in names)
    assert not any(is_quantized_name(f"{n}.weight") for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear))  # fmt: skip
    assert {"model.layers.0.self_attn.kv_b_proj", "model.layers.1.mlp.experts.0.up_proj"} <= set(names)
    # the same model with its weights replaced by the dequantised values gives the same logits:
    # the MoE's stacked expert bank and MLA's absorbed kv_b read the weight through Fp8Linear.weight
    ref = DSVForCausalLM(preset("tiny")).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(("qweight", "weight_scale_inv"))}
    for n in names:
        state[f"{n}.weight"] = model.get_submodule(n).weight
    ref.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(os.environ.get("DSV_KERNELS_TEST_DEVICE") == "cuda", reason="the CPU (interpreter) path")
def test_fp8_bench_records_and_table(monkeypatch: pytest.MonkeyPatch) -> None:
    from dsv.kernels.fp8_bench import layer_shapes, markdown, run_fp8_benchmarks

    # the conftest's NaN-filling torch.empty escapes torch.device("meta"): V3.2's template layers would
    # be allocated for real (a 3.7 GB embedding), so the shapes are read with the real torch.empty
    monkeypatch.setattr(torch, "empty", torch._C._VariableFunctions.empty)

    v32 = dict((label, (n, k)) for label, n, k in layer_shapes("v32"))
    assert v32["q_b_proj"] == (128 * 192, 1536) and v32["kv_b_proj"] == (128 * 256, 512)
    assert v32["dense down"] == (7168, 18432) and v32["expert gate/up"] == (2048, 7168)
    assert v32["indexer.wq_b"] == (64 * 128, 1536) and len(v32) == 11
    records = run_fp8_benchmarks(preset="tiny", tokens=[3], device="cpu", repeats=1, layers=("o_proj",))
    assert [r["impl"] for r in records] == ["bf16", "fp8_linear", "fp8_gemm"]
    assert all(r["ms"] > 0 for r in records)
    assert all(r["err_vs_dequant"] < 1e-2 and r["err_vs_bf16_layer"] < 0.08 for r in records[1:])
    table = markdown(records, "t")
    assert table.count("\n| o_proj | 3 | ") == 1


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_load_fp8_linears_keeps_the_checkpoints_e4m3_tensors(tmp_path: Path, scale_fmt: str | None) -> None:
    from dsv.core.checkpoint import load_pretrained, read_state_dict, save_pretrained
    from dsv.core.convert import quantize
    from dsv.core.model import DSVForCausalLM
    from dsv.core.presets import preset

    save_pretrained(DSVForCausalLM(preset("tiny")), None, tmp_path / "fp32")
    quantize(tmp_path / "fp32", tmp_path / "fp8", scale_fmt=scale_fmt)
    stored = read_state_dict(tmp_path / "fp8")
    model, _ = load_pretrained(tmp_path / "fp8", dtype=torch.float32, with_tokenizer=False)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        dequantised = model(ids).logits
    names = kern.load_fp8_linears(model, tmp_path / "fp8", backend="torch")
    assert {f"{n}.weight" for n in names} == {k for k, t in stored.items() if t.dtype == torch.float8_e4m3fn}
    for n in names:
        layer = model.get_submodule(n)
        assert isinstance(layer, kern.Fp8Linear) and layer.ue8m0 == (scale_fmt == "ue8m0")
        assert torch.equal(
            layer.qweight.view(torch.uint8), stored[f"{n}.weight"].view(torch.uint8)
        )  # bit for bit
        assert torch.equal(layer.weight_scale_inv, stored[f"{n}.weight_scale_inv"])
    with torch.no_grad():  # the CPU path dequantises exactly as the loader did
        assert torch.equal(model(ids).logits, dequantised)
    layer = model.get_submodule(names[0])
    layer.backend = "triton"  # the GPU path, in the interpreter: activations quantised, e4m3 GEMM
    x = torch.randn(5, layer.in_features)
    exact = fp8_gemm_reference(*act_quant_reference(x, ue8m0=layer.ue8m0), layer.qweight, layer.weight_scale_inv,
                               out_dtype=torch.float32)  # fmt: skip
    torch.testing.assert_close(layer(x), exact, rtol=1e-5, atol=1e-5)
    with pytest.raises(CheckpointError, match="stores no FP8 weights"):
        kern.load_fp8_linears(model, tmp_path / "fp32")
