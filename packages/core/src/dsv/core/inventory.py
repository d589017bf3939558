"""What a checkpoint holds, read from ``config.json`` and ``model.safetensors.index.json`` alone.

A V3.2-sized checkpoint is 163 shards and about 690 GB; ``dsv model info`` must describe it without
opening them. The index names every stored tensor (and its shard) but gives no shapes, so the shapes
come from the config: :func:`state_shapes` lists every tensor of ``DSVForCausalLM(config)`` with its
shape without building the model. Building V3.2 on the meta device takes about 20 s (47K modules,
most of them the 256 experts of 58 layers); here one dense block, one MoE block with two experts and
one MTP layer are built and their shapes repeated for every layer and expert, which takes
milliseconds. A folder without an index (one ``model.safetensors``) is described from its header.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import torch

from dsv.core.config import ModelConfig
from dsv.core.errors import CheckpointError
from dsv.core.fp8 import SCALE_SUFFIX, Fp8Config

__all__ = ["CheckpointInventory", "count_parameters_fast", "inventory", "state_shapes"]

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(.*)$")


def _layer_kinds(config: ModelConfig) -> tuple[int, int]:
    """(dense main layers, MoE main layers)."""
    L = config.num_hidden_layers
    dense = L if config.n_routed_experts == 0 else min(config.first_k_dense_replace, L)
    return dense, L - dense


def state_shapes(config: ModelConfig) -> tuple[dict[str, tuple[int, ...]], frozenset[str]]:
    """Every ``state_dict()`` name of ``DSVForCausalLM(config)`` with its shape, and which of them are
    buffers (stored in checkpoints, not parameters). Equal to building the model on the meta device."""
    from dsv.core.model import DSVForCausalLM
    from dsv.core.model.moe import Gate

    L, n_mtp = config.num_hidden_layers, config.num_nextn_predict_layers
    dense, moe = _layer_kinds(config)
    moe_mtp = config.n_routed_experts > 0 and config.first_k_dense_replace <= L
    if n_mtp and config.n_routed_experts > 0 and not moe_mtp:
        # MTP layers that are dense while the main model has experts: no small template has that
        # mix, so build the real thing (slow only for large models configured this way)
        with torch.device("meta"):
            full = DSVForCausalLM(config)
        return {k: tuple(v.shape) for k, v in full.state_dict().items()}, _buffers(full)
    t_dense, t_moe = int(dense > 0), int(moe > 0)
    small = {"n_routed_experts": 2, "n_group": 1, "topk_group": 1, "num_experts_per_tok": 1}
    template_cfg = dataclasses.replace(
        config,
        num_hidden_layers=t_dense + t_moe,
        first_k_dense_replace=t_dense,
        num_nextn_predict_layers=min(n_mtp, 1),
        **(small if config.n_routed_experts > 0 else {}),
    )
    with torch.device("meta"):
        template = DSVForCausalLM(template_cfg)
        gate = Gate(config) if config.n_routed_experts > 0 else None
    gate_shapes = (
        {} if gate is None else {f"mlp.gate.{k}": tuple(v.shape) for k, v in gate.state_dict().items()}
    )
    # real layer indices each template layer stands for
    stands_for = {0: range(dense)} if t_dense else {}
    if t_moe:
        stands_for[t_dense] = range(dense, L)
    if n_mtp:
        stands_for[t_dense + t_moe] = range(L, L + n_mtp)
    shapes: dict[str, tuple[int, ...]] = {}
    buffers = set()
    template_buffers = _buffers(template)
    for name, tensor in template.state_dict().items():
        shape = tuple(tensor.shape)
        m = _LAYER.match(name)
        if m is None:
            shapes[name] = shape
            if name in template_buffers:
                buffers.add(name)
            continue
        t, rest = int(m.group(1)), m.group(2)
        expert = _EXPERT.match(rest)
        if expert is not None and expert.group(1) != "0":
            continue
        names = (
            [f"mlp.experts.{e}.{expert.group(2)}" for e in range(config.n_routed_experts)]
            if expert is not None
            else [rest]
        )
        shape = gate_shapes.get(rest, shape)
        for i in stands_for[t]:
            for r in names:
                shapes[f"model.layers.{i}.{r}"] = shape
                if name in template_buffers:
                    buffers.add(f"model.layers.{i}.{r}")
    return shapes, frozenset(buffers)


def _buffers(model: torch.nn.Module) -> frozenset[str]:
    return frozenset(name for name, _ in model.named_buffers())


def _mtp_prefixes(config: ModelConfig) -> tuple[str, ...]:
    """Name prefixes of the MTP layers (``model.layers.61.`` for V3.2); ``str.startswith`` on a tuple
    is what keeps a 92K-name index fast."""
    L = config.num_hidden_layers
    return tuple(f"model.layers.{i}." for i in range(L, L + config.num_nextn_predict_layers))


def _per_expert(shapes: dict[str, tuple[int, ...]], config: ModelConfig) -> int:
    first = f"model.layers.{_layer_kinds(config)[0]}.mlp.experts.0."
    return sum(prod(s) for k, s in shapes.items() if k.startswith(first))


def count_parameters_fast(config: ModelConfig) -> dict[str, int]:
    """:func:`dsv.core.model.count_parameters` from :func:`state_shapes` (milliseconds, not the ~20 s
    of building V3.2 on the meta device); same keys and values."""
    shapes, buffers = state_shapes(config)
    params = {k: prod(s) for k, s in shapes.items() if k not in buffers}
    total = sum(params.values())
    mtp_names = _mtp_prefixes(config)
    mtp = sum(n for k, n in params.items() if mtp_names and k.startswith(mtp_names))
    moe_layers = _layer_kinds(config)[1]
    per_expert = _per_expert(shapes, config) if moe_layers else 0
    inactive = per_expert * (config.n_routed_experts - config.num_experts_per_tok) * moe_layers
    return {
        "total": total,
        "total_without_mtp": total - mtp,
        "mtp": mtp,
        "routed_experts": per_expert * config.n_routed_experts * moe_layers,
        "active_per_token": total - mtp - inactive,
    }


@dataclass(frozen=True, kw_only=True)
class CheckpointInventory:
    """What a checkpoint folder stores, by name and shape, without its tensor data."""

    source: str  # "index" (names from the index, shapes from the config) or "header"
    shards: int
    tensors: int  # stored tensors, FP8 scales not counted
    stored_bytes: int | None  # the index's metadata.total_size (None without an index)
    parameters: int  # elements of the stored parameters the model has (buffers not counted)
    main: int  # ... outside the MTP layers
    mtp: int  # ... in the MTP layers
    fp8_weights: int  # weights stored in e4m3 with a ``_scale_inv``
    quantization: Fp8Config | None
    mtp_absent: bool  # the config has MTP layers, the checkpoint none of their tensors
    missing: tuple[str, ...]  # tensors the model needs that are not stored (an absent MTP excluded)
    unexpected: tuple[str, ...]  # stored tensors the model does not have


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise CheckpointError(f"{path}: the {what} is not valid JSON ({exc})") from None


def _stored(folder: Path) -> tuple[str, dict[str, tuple[int, ...] | None], int, int | None]:
    """(source, name -> stored shape or None when only the index names it, shards, total_size)."""
    from dsv.core.checkpoint import INDEX_NAME, tensor_index

    index_path = folder / INDEX_NAME
    if index_path.exists():
        index = _read_json(index_path, "safetensors index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_path}: no 'weight_map' object; not a safetensors index")
        total = (index.get("metadata") or {}).get("total_size")
        return (
            "index",
            dict.fromkeys(weight_map),
            len(set(weight_map.values())),
            total if isinstance(total, int) else None,
        )
    metas = tensor_index(folder)
    return "header", {k: m.shape for k, m in metas.items()}, len({m.file for m in metas.values()}), None


def inventory(folder: str | Path) -> CheckpointInventory:
    """Describe the checkpoint in ``folder`` from its ``config.json`` and index (or shard headers).

    Raises :class:`~dsv.core.errors.CheckpointError` / ``ConfigError`` for an unreadable config or
    index. Missing and unexpected tensors are reported, not raised: ``load_pretrained`` is the check."""
    from dsv.core.checkpoint import load_config

    folder = Path(folder)
    config = load_config(folder)
    raw = _read_json(folder / "config.json", "config")
    quant = Fp8Config.from_hf(raw["quantization_config"], str(folder / "config.json")) if isinstance(raw, dict) and "quantization_config" in raw else None  # fmt: skip
    source, stored, shards, total_size = _stored(folder)
    shapes, buffers = state_shapes(config)
    scales = {k for k in stored if k.endswith(SCALE_SUFFIX) and k[: -len(SCALE_SUFFIX)] in stored}
    names = [k for k in stored if k not in scales]
    unexpected = tuple(k for k in names if k not in shapes)
    missing = [k for k in shapes if k not in stored]
    mtp_names = _mtp_prefixes(config) or ("\0",)  # a prefix no name has when there is no MTP
    mtp_missing = [k for k in missing if k.startswith(mtp_names)]
    mtp_absent = bool(config.num_nextn_predict_layers) and len(mtp_missing) == sum(
        1 for k in shapes if k.startswith(mtp_names)
    )
    if mtp_absent:
        missing = [k for k in missing if not k.startswith(mtp_names)]
    main = mtp = 0
    for k in names:
        shape = shapes.get(k)
        if shape is None or k in buffers:
            continue
        n = prod(stored[k] or shape)
        if k.startswith(mtp_names):
            mtp += n
        else:
            main += n
    return CheckpointInventory(
        source=source, shards=shards, tensors=len(names), stored_bytes=total_size,
        parameters=main + mtp, main=main, mtp=mtp,
        fp8_weights=len(scales), quantization=quant, mtp_absent=mtp_absent,
        missing=tuple(missing), unexpected=unexpected,
    )  # fmt: skip
