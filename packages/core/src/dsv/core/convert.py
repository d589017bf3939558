"""Checkpoint conversions, each a pure transform of a checkpoint folder into a new one.

- :func:`add_indexer`: a DeepSeek-V3-architecture checkpoint (``deepseek_v3``) becomes a
  DeepSeek-V3.2 one (``deepseek_v32``) with a freshly initialised lightning indexer in every layer
  (MTP layers included), ready for the DSA warm-up (``dsv train dsa-warmup``).
- :func:`quantize` / :func:`dequantize`: to and from DeepSeek's FP8 layout (:mod:`dsv.core.fp8`:
  e4m3 weights with one fp32 ``weight_scale_inv`` per 128x128 block, ``quantization_config`` in
  ``config.json``).

``add_indexer`` does not rewrite the existing weight shards: they are hard-linked (or copied when
linking is not possible) under their own names, so FP8 checkpoints stay FP8 and conversion needs no
memory for the model. The new indexer tensors go into one extra shard (on an FP8 input, ``wq_b``
and ``wk`` in FP8 with their scales, as V3.2 ships them), the index lists both, and ``config.json``
gains ``index_n_heads`` / ``index_head_dim`` / ``index_topk`` (every other key is kept).
``quantize`` and ``dequantize`` rewrite one shard at a time under the same file names, so they need
memory for about one shard, never for the model. Every result is written into a temporary sibling
folder and renamed into place.

Refused: a checkpoint with ``q_lora_rank: null`` (Moonlight-16B-A3B, DeepSeek-V2-Lite). V3.2's
indexer computes its queries from MLA's q latent ``c_q = RMSNorm(W_qa x)``; such a model projects
queries directly from the hidden state and has no q latent. Inventing one (a new ``W_qa`` plus a
factorised ``W_qb``) would change the attention the checkpoint was trained with, so dsv does not do it.

Run::

    dsv model convert --add-indexer deepseek-ai/DeepSeek-V3.1 out/v31-dsa --index-topk 2048
    dsv model convert --dequantize deepseek-ai/DeepSeek-V3.2 out/v32-bf16
    dsv model convert --quantize fp8 runs/sft/final out/sft-fp8
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsv.core.checkpoint import INDEX_NAME, fp8_pairs, fsync_dir, replace_dir, resolve, tensor_index
from dsv.core.config import ModelConfig
from dsv.core.errors import CheckpointError, ConfigError
from dsv.core.fp8 import BLOCK, SCALE_SUFFIX, Fp8Config, dequantize_fp8, is_quantized_name, quantize_fp8

INDEXER_SHARD = "model-indexer.safetensors"
# V3.2's indexer dimensions (config_671B_v3.2.json).
DEFAULT_INDEX_N_HEADS = 64
DEFAULT_INDEX_HEAD_DIM = 128
DEFAULT_INDEX_TOPK = 2048


@dataclass
class ConversionResult:
    """What :func:`add_indexer` wrote."""

    out: Path
    layers: int  # layers that got an indexer (main + MTP)
    new_tensors: int  # FP8 scales included
    new_parameters: int
    linked_files: int  # weight shards hard-linked rather than copied


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder}: no config.json (is this a checkpoint folder?)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _weight_map(folder: Path) -> dict[str, str]:
    index = folder / INDEX_NAME
    if index.exists():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights found")
    out: dict[str, str] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            out.update({k: f.name for k in sf.keys()})  # noqa: SIM118 (safe_open has no __iter__)
    return out


def _tensor_meta(folder: Path, weight_map: dict[str, str], name: str) -> tuple[torch.dtype, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(folder / weight_map[name]), framework="pt") as sf:
        t = sf.get_slice(name)
        dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(
            t.get_dtype(), torch.bfloat16
        )  # an FP8 weight: the other tensors of DeepSeek's FP8 checkpoints are bf16
        return dtype, tuple(t.get_shape())


def indexer_tensors(
    config: ModelConfig, layers: int, dtype: torch.dtype, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Freshly initialised indexer tensors for ``layers`` layers, named as on the Hub: projections
    ``Normal(0, initializer_range)`` (what :class:`~dsv.core.model.DSVForCausalLM` uses), LayerNorm
    weight 1 and bias 0."""
    assert config.q_lora_rank is not None
    gen = torch.Generator().manual_seed(seed)
    std = config.initializer_range
    H, D, d, r = config.index_n_heads, config.index_head_dim, config.hidden_size, config.q_lora_rank
    out: dict[str, torch.Tensor] = {}
    for i in range(layers):
        p = f"model.layers.{i}.self_attn.indexer."
        out[p + "wq_b.weight"] = (torch.randn(H * D, r, generator=gen) * std).to(dtype)
        out[p + "wk.weight"] = (torch.randn(D, d, generator=gen) * std).to(dtype)
        out[p + "k_norm.weight"] = torch.ones(D, dtype=dtype)
        out[p + "k_norm.bias"] = torch.zeros(D, dtype=dtype)
        out[p + "weights_proj.weight"] = (torch.randn(H, d, generator=gen) * std).to(dtype)
    return out


def _link_or_copy(src: Path, dst: Path) -> bool:
    try:
        os.link(src, dst)
        return True
    except OSError:
        shutil.copy2(src, dst)
        return False


def add_indexer(
    src: str | Path,
    out: str | Path,
    *,
    index_n_heads: int = DEFAULT_INDEX_N_HEADS,
    index_head_dim: int = DEFAULT_INDEX_HEAD_DIM,
    index_topk: int = DEFAULT_INDEX_TOPK,
    seed: int = 0,
    overwrite: bool = False,
) -> ConversionResult:
    """Convert the ``deepseek_v3`` checkpoint ``src`` (folder or Hub repo id) into a ``deepseek_v32``
    checkpoint at ``out`` with a new indexer (see the module docstring)."""
    from safetensors.torch import save_file

    folder = resolve(src)
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another folder or pass --force")
    raw = _read_config(folder)
    model_type = raw.get("model_type")
    if model_type == "deepseek_v32":
        raise CheckpointError(f"{folder} is already deepseek_v32 (it has an indexer); nothing to convert")
    if model_type != "deepseek_v3":
        raise CheckpointError(
            f"{folder}: model_type is {model_type!r}; --add-indexer converts deepseek_v3 checkpoints only"
        )
    if raw.get("q_lora_rank") is None:
        raise CheckpointError(
            f"{folder} has q_lora_rank: null (no MLA q latent, as in Moonlight-16B-A3B or DeepSeek-V2-Lite); "
            "V3.2's indexer reads that q latent, so it cannot be added without changing the model's attention. "
            "Use a checkpoint with q_lora_rank set (e.g. DeepSeek-V3, V3.1)"
        )
    new_raw = dict(raw)
    new_raw.update(model_type="deepseek_v32", architectures=["DeepseekV32ForCausalLM"],
                   index_n_heads=index_n_heads, index_head_dim=index_head_dim, index_topk=index_topk)  # fmt: skip
    for key in ("auto_map", "rope_interleave"):  # V3 remote code does not know the indexer
        new_raw.pop(key, None)
    try:
        config = ModelConfig.from_hf_dict(new_raw, source="converted config")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None

    weight_map = _weight_map(folder)
    layers = config.num_hidden_layers + config.num_nextn_predict_layers
    present = {int(k.split(".")[2]) for k in weight_map if k.startswith("model.layers.")}
    layers = max(config.num_hidden_layers, min(layers, max(present) + 1 if present else 0))
    clash = [k for k in weight_map if ".self_attn.indexer." in k]
    if clash:
        raise CheckpointError(
            f"{folder} already holds indexer tensors ({clash[0]}...) despite model_type deepseek_v3"
        )
    probe = "model.layers.0.self_attn.q_a_proj.weight"
    if probe not in weight_map:
        raise CheckpointError(f"{folder}: {probe} not found; is this a DeepSeek-V3-architecture checkpoint?")
    dtype, shape = _tensor_meta(folder, weight_map, probe)
    if shape != (config.q_lora_rank, config.hidden_size):
        raise CheckpointError(
            f"{folder}: {probe} has shape {shape}, config says ({config.q_lora_rank}, {config.hidden_size})"
        )
    new = indexer_tensors(config, layers, dtype, seed)
    if raw.get("quantization_config") is not None:
        # V3.2 ships the indexer's wq_b and wk in FP8 like every other projection (fp8 module doc)
        fp8 = Fp8Config.from_hf(raw["quantization_config"], f"{folder}/config.json")
        new = _quantize_tensors(new, fp8)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    linked = 0
    try:
        shards = set(weight_map.values())
        for item in folder.iterdir():
            if item.name in ("config.json", INDEX_NAME) or item.name.startswith("."):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            elif item.name in shards:
                linked += _link_or_copy(item.resolve(), tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        save_file(new, str(tmp / INDEXER_SHARD), metadata={"format": "pt"})
        merged = {**weight_map, **dict.fromkeys(new, INDEXER_SHARD)}
        total = sum((tmp / f).stat().st_size for f in set(merged.values()))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(merged.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(new_raw, indent=2, ensure_ascii=False) + "\n")
        fsync_dir(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConversionResult(
        out=out, layers=layers, new_tensors=len(new), new_parameters=sum(t.numel() for k, t in new.items() if not k.endswith(SCALE_SUFFIX)),
        linked_files=linked,
    )  # fmt: skip


# ----------------------------------------------------------------------------- FP8


@dataclass
class RewriteResult:
    """What :func:`quantize` or :func:`dequantize` wrote."""

    out: Path
    tensors: int  # tensors converted (quantised or dequantised)
    bytes_in: int  # weight bytes read
    bytes_out: int  # weight bytes written


def _quantize_tensors(state: dict[str, torch.Tensor], fp8: Fp8Config) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if is_quantized_name(name) and t.dim() == 2 and t.is_floating_point():
            out[name], out[name + SCALE_SUFFIX] = quantize_fp8(
                t, fp8.weight_block_size, scale_fmt=fp8.scale_fmt
            )
        else:
            out[name] = t
    return out


def _rewrite(
    src: str | Path,
    out: str | Path,
    overwrite: bool,
    check: Any,
    shard: Any,
    new_config: Any,
) -> RewriteResult:
    """Shared loop of :func:`quantize` and :func:`dequantize`: ``check(folder, raw, index)`` refuses
    bad input before anything is written; ``shard(file, names, index)`` returns one output shard's
    tensors (written under the input shard's name); ``new_config(raw)`` is the output config.json."""
    from safetensors.torch import save_file

    folder = resolve(src)
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another folder or pass --force")
    raw = _read_config(folder)
    index = tensor_index(folder)
    check(folder, raw, index)
    by_file: dict[Path, list[str]] = {}
    for name, meta in index.items():
        by_file.setdefault(meta.file, []).append(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    weight_map: dict[str, str] = {}
    total = converted = 0
    try:
        for f, names in by_file.items():
            tensors, n = shard(f, names, index)
            converted += n
            save_file(tensors, str(tmp / f.name), metadata={"format": "pt"})
            for k, v in tensors.items():
                weight_map[k] = f.name
                total += v.numel() * v.element_size()
            del tensors
        shards = {m.file.name for m in index.values()}
        for item in folder.iterdir():
            if item.name in ("config.json", INDEX_NAME) or item.name in shards or item.name.startswith("."):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            elif item.suffix != ".safetensors":
                shutil.copy2(item, tmp / item.name)
        index_json = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index_json, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(new_config(raw), indent=2, ensure_ascii=False) + "\n")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    bytes_in = sum(m.file.stat().st_size for m in {m.file: m for m in index.values()}.values())
    return RewriteResult(out=out, tensors=converted, bytes_in=bytes_in, bytes_out=total)


def quantize(
    src: str | Path,
    out: str | Path,
    *,
    block: tuple[int, int] = BLOCK,
    scale_fmt: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    overwrite: bool = False,
) -> RewriteResult:
    """Write ``src`` in DeepSeek's FP8 layout at ``out``: the projections :func:`~dsv.core.fp8.is_quantized_name`
    names become e4m3 with ``<name>_scale_inv``; every other floating-point tensor is stored in
    ``dtype`` (bf16, as DeepSeek ships them), and ``config.json`` gains ``quantization_config``."""
    fp8 = Fp8Config(weight_block_size=block, scale_fmt=scale_fmt)

    def check(folder: Path, raw: dict[str, Any], index: dict[str, Any]) -> None:
        if raw.get("quantization_config") is not None or any(k.endswith(SCALE_SUFFIX) for k in index):
            raise CheckpointError(
                f"{folder} is already quantised; nothing to do (--dequantize converts it back)"
            )
        if not any(is_quantized_name(k) for k in index):
            raise CheckpointError(
                f"{folder}: no tensor has a DeepSeek projection name; is this a dsv checkpoint?"
            )

    def shard(f: Path, names: list[str], index: dict[str, Any]) -> tuple[dict[str, torch.Tensor], int]:
        from safetensors import safe_open

        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(f), framework="pt") as sf:
            for name in names:
                t = sf.get_tensor(name)
                tensors[name] = t.to(dtype) if t.is_floating_point() else t
                if is_quantized_name(name) and t.dim() == 2 and t.is_floating_point():
                    tensors.update(_quantize_tensors({name: t}, fp8))
        return tensors, sum(k.endswith(SCALE_SUFFIX) for k in tensors)

    def new_config(raw: dict[str, Any]) -> dict[str, Any]:
        return {**raw, "torch_dtype": str(dtype).removeprefix("torch."), "quantization_config": fp8.to_hf()}

    return _rewrite(src, out, overwrite, check, shard, new_config)


def dequantize(
    src: str | Path, out: str | Path, *, dtype: torch.dtype = torch.bfloat16, overwrite: bool = False
) -> RewriteResult:
    """Write the FP8 checkpoint ``src`` with every weight dequantised to ``dtype`` (and every other
    floating-point tensor cast to it) at ``out``, without scales or ``quantization_config``."""
    pairs: dict[str, str] = {}
    block: list[tuple[int, int]] = []

    def check(folder: Path, raw: dict[str, Any], index: dict[str, Any]) -> None:
        if raw.get("quantization_config") is None and not any(k.endswith(SCALE_SUFFIX) for k in index):
            raise CheckpointError(
                f"{folder} is not quantised (config.json has no quantization_config); nothing to do"
            )
        found, b = fp8_pairs(index, folder)
        pairs.update(found)
        block.append(b)

    def shard(f: Path, names: list[str], index: dict[str, Any]) -> tuple[dict[str, torch.Tensor], int]:
        from safetensors import safe_open

        tensors: dict[str, torch.Tensor] = {}
        n = 0
        with safe_open(str(f), framework="pt") as sf:
            for name in names:
                if name.endswith(SCALE_SUFFIX) and name.removesuffix(SCALE_SUFFIX) in pairs:
                    continue
                t = sf.get_tensor(name)
                if name in pairs:
                    scale_file = index[pairs[name]].file
                    if scale_file == f:
                        scale = sf.get_tensor(pairs[name])
                    else:
                        with safe_open(str(scale_file), framework="pt") as other:
                            scale = other.get_tensor(pairs[name])
                    t = dequantize_fp8(t, scale, block[0], dtype=dtype, name=name)
                    n += 1
                tensors[name] = t.to(dtype) if t.is_floating_point() else t
        return tensors, n

    def new_config(raw: dict[str, Any]) -> dict[str, Any]:
        cfg = {k: v for k, v in raw.items() if k != "quantization_config"}
        return {**cfg, "torch_dtype": str(dtype).removeprefix("torch.")}

    return _rewrite(src, out, overwrite, check, shard, new_config)
