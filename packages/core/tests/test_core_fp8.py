"""FP8 block-quantised checkpoints (DeepSeek's layout): the block formula, ``dsv model convert
--quantize fp8`` / ``--dequantize``, loading with dequantisation, and the errors for bad input.

Run: ``pytest packages/core/tests/test_core_fp8.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv.core.checkpoint import INDEX_NAME, load_pretrained, read_state_dict, save_pretrained
from dsv.core.convert import dequantize, quantize
from dsv.core.errors import CheckpointError
from dsv.core.fp8 import FP8_MAX, Fp8Config, dequantize_fp8, is_quantized_name, quantize_fp8, scale_shape
from dsv.core.model import DSVForCausalLM
from dsv.core.presets import tiny

# e4m3 keeps 3 mantissa bits: a normal value is off by at most 2^-4 of itself after rounding, a
# subnormal one (below 2^-6 in units of the scale) by at most half the smallest step, 2^-10.
REL, SUB = 2.0**-4, 2.0**-10


def _block(w: torch.Tensor, i: int, j: int, b: int = 128) -> torch.Tensor:
    return w[i * b : (i + 1) * b, j * b : (j + 1) * b]


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_round_trip_equals_the_block_formula_by_hand(scale_fmt: str | None) -> None:
    w = torch.randn(300, 200) * torch.logspace(-3, 1, 300)[:, None]  # blocks of very different ranges
    q, s = quantize_fp8(w, scale_fmt=scale_fmt)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32 and tuple(s.shape) == (3, 2) == scale_shape((300, 200))
    deq = dequantize_fp8(q, s, dtype=torch.float32)
    # (0, 0) a whole block; (2, 1) the corner, 44 x 72 (both edges partial); (2, 0) and (0, 1) one edge each
    for i, j in [(0, 0), (2, 1), (2, 0), (0, 1)]:
        blk = _block(w, i, j)
        scale = blk.abs().max() / FP8_MAX
        if scale_fmt == "ue8m0":
            scale = torch.exp2(torch.ceil(torch.log2(scale)))
            assert float(torch.log2(s[i, j])).is_integer()
        assert s[i, j] == scale
        by_hand = (blk / scale).to(torch.float8_e4m3fn)
        assert torch.equal(_block(q, i, j).float(), by_hand.float())
        assert torch.equal(_block(deq, i, j), by_hand.float() * scale)
        err = (_block(deq, i, j) - blk).abs()
        assert bool((err <= torch.maximum(blk.abs() * REL, scale * SUB) + 1e-12).all())
    zero = torch.zeros(130, 5)
    qz, sz = quantize_fp8(zero)
    assert torch.equal(dequantize_fp8(qz, sz, dtype=torch.float32), zero)


def test_which_tensors_the_official_layout_quantises() -> None:
    names = DSVForCausalLM(tiny()).state_dict()
    quantised = {n.split(".", 3)[-1] for n in names if is_quantized_name(n)}
    assert "self_attn.indexer.wq_b.weight" in quantised and "self_attn.indexer.wk.weight" in quantised
    assert {"self_attn.q_a_proj.weight", "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight",
            "mlp.gate_proj.weight", "mlp.shared_experts.down_proj.weight"} <= quantised  # fmt: skip
    kept = [n for n in names if not is_quantized_name(n)]
    for never in ["model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                  "model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.0.self_attn.indexer.weights_proj.weight",
                  "model.layers.0.self_attn.indexer.k_norm.weight", "model.layers.2.eh_proj.weight",
                  "model.layers.2.shared_head.head.weight", "model.norm.weight"]:  # fmt: skip
        assert never in kept


@pytest.fixture(scope="module")
def fp32_and_fp8(tmp_path_factory: pytest.TempPathFactory) -> tuple[DSVForCausalLM, Path, Path]:
    torch.manual_seed(0)
    model = DSVForCausalLM(tiny()).eval()
    root = tmp_path_factory.mktemp("fp8")
    src = save_pretrained(model, None, root / "fp32", max_shard_bytes=1 << 20)  # 3 shards
    quantize(src, root / "fp8")
    return model, src, root / "fp8"


def test_quantised_checkpoint_layout_and_index(fp32_and_fp8: tuple[DSVForCausalLM, Path, Path]) -> None:
    model, src, out = fp32_and_fp8
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128],
    }  # fmt: skip
    assert cfg["torch_dtype"] == "bfloat16"
    index = json.loads((out / INDEX_NAME).read_text())
    stored = read_state_dict(out)
    assert set(index["weight_map"]) == set(stored)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    # the same shard files as the source, each tensor listed in the file that holds it
    assert sorted(set(index["weight_map"].values())) == sorted(p.name for p in src.glob("*.safetensors"))
    for f in set(index["weight_map"].values()):
        assert all(index["weight_map"][k] == f for k in load_file(out / f))
    for name, t in model.state_dict().items():
        if is_quantized_name(name):
            assert stored[name].dtype == torch.float8_e4m3fn
            assert stored[name + "_scale_inv"].dtype == torch.float32
            assert tuple(stored[name + "_scale_inv"].shape) == scale_shape(tuple(t.shape))
        else:
            assert stored[name].dtype == torch.bfloat16 and name + "_scale_inv" not in stored
    assert len(stored) == len(model.state_dict()) + sum(map(is_quantized_name, model.state_dict()))


def test_fp8_checkpoint_loads_dequantised(fp32_and_fp8: tuple[DSVForCausalLM, Path, Path]) -> None:
    model, _, out = fp32_and_fp8
    stored = read_state_dict(out)
    loaded, _ = load_pretrained(out)  # fp32
    for name, p in loaded.state_dict().items():
        want = (
            dequantize_fp8(stored[name], stored[name + "_scale_inv"], dtype=torch.float32)
            if name + "_scale_inv" in stored
            else stored[name].float()
        )
        assert torch.equal(p, want), name
    ids = torch.randint(0, 1024, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = model(ids).logits, loaded(ids).logits
    # Stated tolerance: FP8 weights plus bf16 embeddings, norms and head move the logits of this random
    # tiny model by under 10% of their norm (measured 0.05 max-abs on logits of std 0.16).
    assert float((got - ref).norm() / ref.norm()) < 0.10
    assert bool((got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.5)
    bf16, _ = load_pretrained(out, dtype=None)
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16


def test_transformers_loads_the_fp8_checkpoint_with_the_same_logits(
    fp32_and_fp8: tuple[DSVForCausalLM, Path, Path],
) -> None:
    transformers = pytest.importorskip("transformers")
    _, _, out = fp32_and_fp8
    # Without a GPU transformers' FineGrainedFP8 quantizer dequantises the e4m3 weights on load.
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager"
    )
    ours, _ = load_pretrained(out)
    ids = torch.randint(0, 1024, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = hf.eval()(ids).logits
        ref = ours(ids).logits
    assert float((got - ref).abs().max()) < 1e-4


def test_dequantize_writes_a_plain_checkpoint(
    fp32_and_fp8: tuple[DSVForCausalLM, Path, Path], tmp_path: Path
) -> None:
    _, _, fp8 = fp32_and_fp8
    r = dequantize(fp8, tmp_path / "bf16")
    cfg = json.loads((r.out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"
    stored, plain = read_state_dict(fp8), read_state_dict(r.out)
    assert not any(k.endswith("_scale_inv") for k in plain)
    index = json.loads((r.out / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(plain)
    assert r.tensors == sum(k.endswith("_scale_inv") for k in stored)
    for name, t in plain.items():
        assert t.dtype == torch.bfloat16
        if name + "_scale_inv" in stored:
            assert torch.equal(
                t, dequantize_fp8(stored[name], stored[name + "_scale_inv"], dtype=torch.bfloat16)
            )
    a, _ = load_pretrained(r.out)
    b, _ = load_pretrained(fp8, dtype=torch.bfloat16)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        r.out, dtype=torch.float32, attn_implementation="eager"
    )
    ids = torch.randint(0, 1024, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert float((hf.eval()(ids).logits - a(ids).logits).abs().max()) < 1e-4
    with pytest.raises(CheckpointError, match="not quantised"):
        dequantize(r.out, tmp_path / "again")
    with pytest.raises(CheckpointError, match="already quantised"):
        quantize(fp8, tmp_path / "twice")


def _rewrite_shard(folder: Path, edit: object) -> None:
    for f in folder.glob("*.safetensors"):
        state = load_file(f)
        edit(state)  # type: ignore[operator]
        save_file(state, f, metadata={"format": "pt"})
    index = folder / INDEX_NAME
    data = json.loads(index.read_text())
    names = {k for f in folder.glob("*.safetensors") for k in load_file(f)}
    data["weight_map"] = {k: v for k, v in data["weight_map"].items() if k in names}
    index.write_text(json.dumps(data))


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _set_quant(folder: Path, **fields: object) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"].update(fields)
    (folder / "config.json").write_text(json.dumps(cfg))


NAME = "model.layers.0.self_attn.q_a_proj.weight"


def test_bad_fp8_checkpoints_are_one_line_errors(
    fp32_and_fp8: tuple[DSVForCausalLM, Path, Path], tmp_path: Path
) -> None:
    _, _, fp8 = fp32_and_fp8
    cases: list[tuple[Path, str]] = []
    missing = _copy(fp8, tmp_path / "missing")
    _rewrite_shard(missing, lambda s: s.pop(NAME + "_scale_inv", None))
    cases.append((missing, f"1 FP8 weight\\(s\\) without their _scale_inv: {NAME}"))
    block = _copy(fp8, tmp_path / "block")
    _set_quant(block, weight_block_size=[16, 16])
    cases.append((block, r"wrong shape or dtype for weight_block_size \[16, 16\]"))
    awq = _copy(fp8, tmp_path / "awq")
    _set_quant(awq, quant_method="awq")
    cases.append((awq, "quant_method 'awq' is not supported"))
    fmt = _copy(fp8, tmp_path / "fmt")
    _set_quant(fmt, scale_fmt="e8m0-bytes")
    cases.append((fmt, "scale_fmt 'e8m0-bytes' is not supported"))
    noconfig = _copy(fp8, tmp_path / "noconfig")
    cfg = json.loads((noconfig / "config.json").read_text())
    del cfg["quantization_config"]
    (noconfig / "config.json").write_text(json.dumps(cfg))
    cases.append((noconfig, "stored in FP8 .* but config.json has no quantization_config"))
    orphan = _copy(fp8, tmp_path / "orphan")
    _rewrite_shard(orphan, lambda s: s.update({NAME: s[NAME].float().bfloat16()}) if NAME in s else None)
    cases.append((orphan, f"1 scale\\(s\\) without an FP8 weight: {NAME}_scale_inv"))
    for folder, pattern in cases:
        with pytest.raises(CheckpointError, match=pattern) as info:
            load_pretrained(folder)
        assert "\n" not in str(info.value), folder.name
    with pytest.raises(CheckpointError, match="wrong shape"):
        dequantize(block, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="must be two positive integers"):
        Fp8Config.from_hf({"quant_method": "fp8", "weight_block_size": [128]}, "config.json")


def test_a_model_that_cannot_fit_says_what_it_needs(tmp_path: Path) -> None:
    from dsv.core.presets import v32

    folder = tmp_path / "v32"
    folder.mkdir()
    # Only the config: the check comes before any shard is opened (30 of V3.2's layers in fp32 are ~1.3 TB).
    (folder / "config.json").write_text(json.dumps(v32(num_hidden_layers=30).to_hf_dict()))
    with pytest.raises(CheckpointError, match=r"the model needs \d+\.\d GiB in float32 on cpu, but only"):
        load_pretrained(folder)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    code = "from dsv.core.cli import model_app; model_app()"
    return subprocess.run(
        [sys.executable, "-c", code, "convert", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_quantize_dequantize_and_errors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = save_pretrained(DSVForCausalLM(tiny()), None, tmp_path / "src")
    ok = _cli(str(src), str(tmp_path / "q"), "--quantize", "fp8", "--scale-fmt", "ue8m0")
    assert ok.returncode == 0, ok.stderr
    assert "weights in FP8" in ok.stdout
    assert (
        json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["scale_fmt"]
        == "ue8m0"
    )
    ok = _cli(str(tmp_path / "q"), str(tmp_path / "d"), "--dequantize", "--dtype", "float32")
    assert ok.returncode == 0, ok.stderr
    assert load_file(tmp_path / "d" / "model-00001-of-00001.safetensors")[NAME].dtype == torch.float32
    for args, code, text in [
        ((str(src), str(tmp_path / "x"), "--quantize", "int4"), 2, "the only method is fp8"),
        ((str(src), str(tmp_path / "x"), "--quantize", "fp8", "--dequantize"), 2, "exactly one of"),
        ((str(src), str(tmp_path / "x")), 2, "exactly one of"),
        ((str(src), str(tmp_path / "x"), "--dequantize"), 1, "not quantised"),
        ((str(tmp_path / "q"), str(tmp_path / "d"), "--dequantize"), 1, "already exists"),
    ]:
        bad = _cli(*args)
        assert bad.returncode == code, (args, bad.stderr)
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], bad.stderr
    assert not (tmp_path / "x").exists()


def test_add_indexer_on_fp8_v3_then_dsa_warmup(tmp_path: Path) -> None:
    pytest.importorskip("dsv.train")
    from dsv.core.convert import add_indexer
    from dsv.core.tokenizer import default_corpus, train_bpe

    torch.manual_seed(0)
    cfg = tiny(model_type="deepseek_v3")
    v3 = save_pretrained(DSVForCausalLM(cfg), train_bpe(default_corpus(300), cfg.vocab_size), tmp_path / "v3")
    fp8 = quantize(v3, tmp_path / "v3-fp8").out
    r = add_indexer(fp8, tmp_path / "v32-fp8", index_n_heads=4, index_head_dim=16, index_topk=8)
    stored = read_state_dict(r.out)
    for layer in range(r.layers):  # main + MTP layers, in V3.2's layout: projections FP8, the rest bf16
        p = f"model.layers.{layer}.self_attn.indexer."
        for name in ("wq_b.weight", "wk.weight"):
            assert stored[p + name].dtype == torch.float8_e4m3fn
            assert tuple(stored[p + name + "_scale_inv"].shape) == scale_shape(tuple(stored[p + name].shape))
        for name in ("weights_proj.weight", "k_norm.weight", "k_norm.bias"):
            assert stored[p + name].dtype == torch.bfloat16 and p + name + "_scale_inv" not in stored
    assert json.loads((r.out / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"
    assert r.new_parameters == sum(
        t.numel() for k, t in stored.items() if ".indexer." in k and not k.endswith("_scale_inv")
    )
    model, tok = load_pretrained(r.out)
    assert tok is not None and model.config.model_type == "deepseek_v32"
    run = tmp_path / "warm"
    proc = subprocess.run(
        [sys.executable, "-m", "dsv.train", "dsa-warmup", "--model", str(r.out), "--out", str(run),
         "--steps", "2", "--seq-len", "32", "--micro-batch-size", "2", "--default-data-size", "120",
         "--save-every", "0", "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = read_state_dict(run / "final")
    assert not any(k.endswith("_scale_inv") for k in after)  # the trained copy is plain (dequantised)
    w = "model.layers.0.self_attn.indexer.wq_b.weight"
    start = dequantize_fp8(stored[w], stored[w + "_scale_inv"], dtype=torch.float32)
    assert not torch.equal(after[w].float(), start)  # the indexer trained
    q = "model.layers.0.self_attn.q_a_proj.weight"
    assert torch.equal(
        after[q].float(), dequantize_fp8(stored[q], stored[q + "_scale_inv"], dtype=torch.float32)
    )
