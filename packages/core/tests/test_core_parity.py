"""Parity with transformers: dsv checkpoints load in DeepseekV32ForCausalLM / DeepseekV3ForCausalLM
and give the same fp32 logits (<= 1e-4 max-abs), and transformers' checkpoints load in dsv.

Regimes: sequence shorter than ``index_topk`` (DSA == dense), several times longer (sparse selection
active), and token-by-token decoding with the cache against one full forward.

The indexer uses 8 heads here: with very few heads many scores are exactly 0 (every ReLU off) and
top-k ties at the boundary may break differently in two correct implementations.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dsv.core.cache import DenseKVCache  # noqa: E402
from dsv.core.checkpoint import load_pretrained, save_pretrained  # noqa: E402
from dsv.core.model import DSVForCausalLM  # noqa: E402
from dsv.core.presets import tiny  # noqa: E402

TOL = 1e-4


def _config(model_type: str):
    if model_type == "deepseek_v3":
        return tiny(
            model_type="deepseek_v3",
            num_nextn_predict_layers=0,
            index_n_heads=0,
            index_head_dim=0,
            index_topk=0,
        )
    return tiny(index_n_heads=8, index_topk=16, num_nextn_predict_layers=0)


def _random_model(model_type: str) -> DSVForCausalLM:
    model = DSVForCausalLM(_config(model_type)).eval()
    with torch.no_grad():  # exercise the routing bias and non-trivial norms
        for moe in model.moe_layers:
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _hf_load(folder: Path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    )
    return hf.eval()


@pytest.fixture(scope="module", params=["deepseek_v32", "deepseek_v3"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(1)
    model = _random_model(request.param)
    folder = save_pretrained(model, None, tmp_path_factory.mktemp("parity") / request.param)
    hf = _hf_load(folder)
    expected = "DeepseekV32ForCausalLM" if request.param == "deepseek_v32" else "DeepseekV3ForCausalLM"
    assert type(hf).__name__ == expected
    return model, hf


# The three ways a forward reaches the DSA ops: the default dispatch (at CPU inference dsv-kernels' compiled
# kernel when it is built), the torch references forced by DSV_KERNELS=torch (the ground truth the Triton
# kernels are tested against), and a forward under autograd (training: the references, whatever the env).
PATHS = ["default", "torch-reference", "with-gradients"]


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "torch-reference":
        monkeypatch.setenv("DSV_KERNELS", "torch")
    else:
        monkeypatch.delenv("DSV_KERNELS", raising=False)
    return request.param


@pytest.mark.parametrize("length", [12, 16, 80], ids=["shorter-than-topk", "equal-topk", "5x-topk-sparse"])
def test_full_forward_matches_transformers(pair, length: int, path: str) -> None:
    model, hf = pair
    x = torch.randint(0, model.config.vocab_size, (2, length))
    with torch.no_grad():
        theirs = hf(x).logits
    with torch.set_grad_enabled(path == "with-gradients"):
        ours = model(x, return_indices=True)
    if path == "with-gradients":
        assert ours.logits.requires_grad
        ours.logits.logsumexp(-1).mean().backward()  # the training path also runs backward
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        model.zero_grad(set_to_none=True)
        assert grads and all(g.isfinite().all() for g in grads)
    assert (ours.logits.detach() - theirs).abs().max().item() <= TOL
    if model.config.has_indexer and length > model.config.index_topk:
        # the sparse regime really is sparse: late queries attend to index_topk of their keys only
        idx = ours.indices[0]
        assert idx.shape[-1] == model.config.index_topk
        assert int((idx[:, -1] >= 0).sum(-1).min()) == model.config.index_topk < length


@pytest.mark.parametrize("forced", ["", "torch"], ids=["default", "torch-reference"])
def test_decode_with_cache_matches_full_forward(pair, forced: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSV_KERNELS", forced)
    model, hf = pair
    x = torch.randint(0, model.config.vocab_size, (1, 64))
    with torch.no_grad():
        full_hf = hf(x).logits
        cache = DenseKVCache(model.config, 1, 64)
        steps = [model(x[:, :5], cache=cache).logits]
        steps += [model(x[:, t : t + 1], cache=cache).logits for t in range(5, 64)]
    decoded = torch.cat(steps, dim=1)
    assert (decoded - full_hf).abs().max().item() <= TOL


def test_transformers_checkpoint_loads_in_dsv(tmp_path: Path) -> None:
    cfg = _config("deepseek_v32")
    hf_cfg = transformers.DeepseekV32Config(
        **{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type")}
    )
    torch.manual_seed(3)
    hf = transformers.DeepseekV32ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        biases = [b for name, b in hf.named_buffers() if name.endswith("e_score_correction_bias")]
        assert biases
        for b in biases:
            b.normal_(0, 0.05)
    hf.save_pretrained(tmp_path / "hf")
    model, _ = load_pretrained(tmp_path / "hf")
    x = torch.randint(0, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        assert (model(x).logits - hf(x).logits).abs().max().item() <= TOL
