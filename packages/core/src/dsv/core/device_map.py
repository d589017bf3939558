"""Placing a model's layers across several devices (``device_map``-style, as accelerate's
``infer_auto_device_map``), planned from the config alone.

The units are the modules a forward visits in order: the embedding, each decoder block, the final
norm, the LM head, then the MTP layers (they read the last hidden state and the head, so they sit
with the head). Sizes come from :func:`dsv.core.inventory.state_shapes` in the dtype the loader
gives each tensor (every router and indexer ``weights_proj`` stays fp32, the MTP layer's too), so a 671B plan takes
milliseconds and reads no weights. Units are laid out in order, each device taking about an equal
share of the bytes and never more than its ``max_memory``; consecutive units share a device, so
activations cross a device boundary only ``len(devices) - 1`` times per forward.

This is the plan and the placement of the parameters. A forward across several devices needs the
activations (and each layer's KV cache) moved at the boundaries; the model does not do that yet.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from math import prod

import torch
from torch import nn

from dsv.core.config import ModelConfig
from dsv.core.errors import DSVError

__all__ = ["DevicePlan", "place", "plan_device_map"]

_FP32 = re.compile(r"(^|\.)mlp\.gate\.|\.indexer\.weights_proj\.")  # kept in fp32 by the loader
_UNIT = re.compile(r"^(model\.layers\.\d+|model\.embed_tokens|model\.norm|lm_head)\.")
_GIB = 1024**3


@dataclass(frozen=True)
class DevicePlan:
    """``units``: module name -> device, in forward order; ``bytes``: device -> bytes planned there."""

    units: dict[str, str]
    bytes: dict[str, int]

    def device_of(self, tensor_name: str) -> str:
        """The device of a ``state_dict`` name (``model.layers.7.mlp.experts.3.up_proj.weight``)."""
        for unit, device in self.units.items():
            if tensor_name.startswith(unit + "."):
                return device
        raise KeyError(f"{tensor_name}: no unit of the plan holds it")


def _units(config: ModelConfig) -> list[str]:
    L = config.num_hidden_layers
    mtp = [f"model.layers.{L + j}" for j in range(config.num_nextn_predict_layers)]
    return ["model.embed_tokens", *(f"model.layers.{i}" for i in range(L)), "model.norm", "lm_head", *mtp]


def plan_device_map(
    config: ModelConfig,
    devices: list[str],
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_memory: dict[str, int] | None = None,
) -> DevicePlan:
    """Lay the model's units over ``devices`` in forward order, about an equal share of bytes each.

    ``max_memory`` caps what each device may hold (bytes; a device left out of it is only limited
    by the equal share). Raises :class:`~dsv.core.errors.DSVError` naming what is needed and what
    the devices hold when the model does not fit."""
    from dsv.core.inventory import state_shapes

    if not devices:
        raise DSVError("device_map: give at least one device")
    if len(set(devices)) != len(devices):
        raise DSVError(f"device_map: devices must be distinct, got {devices}")
    unknown = sorted(set(max_memory or {}) - set(devices))
    if unknown:
        raise DSVError(f"device_map: max_memory names device(s) not in the plan: {', '.join(unknown)}")
    shapes, _ = state_shapes(config)
    units = _units(config)
    size = dict.fromkeys(units, 0)
    item = torch.empty((), dtype=dtype).element_size()
    for name, shape in shapes.items():
        m = _UNIT.match(name)
        if m is None or m.group(1) not in size:
            raise DSVError(f"device_map: {name} belongs to no unit of the plan")  # a model change to follow
        # The loader keeps routers and indexer weights_proj in fp32, the MTP layer's too (_cast).
        size[m.group(1)] += prod(shape) * (4 if _FP32.search(name) else item)
    total = sum(size.values())
    caps = {d: (max_memory or {}).get(d) for d in devices}
    known = [c for c in caps.values() if c is not None]
    if len(known) == len(devices) and total > sum(known):
        raise DSVError(
            f"device_map: the model needs {total / _GIB:.1f} GiB in {str(dtype).removeprefix('torch.')}, but the "
            f"{len(devices)} device(s) hold {sum(known) / _GIB:.1f} GiB in all (max_memory); add devices or use "
            "a smaller dtype"
        )
    plan: dict[str, str] = {}
    used = dict.fromkeys(devices, 0)
    d = 0
    left = total
    share = -(-left // len(devices))  # each device's fair part of what is still to place
    for unit in units:
        while True:
            dev = devices[d]
            cap = caps[dev]
            fits_cap = cap is None or used[dev] + size[unit] <= cap
            # a unit goes where most of it falls within the share: rounding, not truncating
            fits_share = used[dev] == 0 or used[dev] + size[unit] / 2 <= share or d == len(devices) - 1
            if fits_cap and fits_share:
                break
            d += 1
            if d == len(devices):
                raise DSVError(
                    f"device_map: {unit} ({size[unit] / _GIB:.2f} GiB) does not fit on any device left; the model "
                    f"needs {total / _GIB:.1f} GiB and the devices hold "
                    + ", ".join(f"{x}: {c / _GIB:.1f} GiB" for x, c in caps.items() if c is not None)
                )
            share = -(-left // (len(devices) - d))
        plan[unit] = dev
        used[dev] += size[unit]
        left -= size[unit]
    return DevicePlan(units=plan, bytes={k: v for k, v in used.items() if v})


def place(model: nn.Module, plan: DevicePlan) -> nn.Module:
    """Put each unit of ``model`` on its planned device: modules still on the meta device get fresh,
    uninitialised storage there (``to_empty``, for the loader to fill); others are moved."""
    for unit, device in plan.units.items():
        try:
            module = model.get_submodule(unit)
        except AttributeError:
            raise DSVError(
                f"device_map: the model has no module {unit}; was the plan made for another config?"
            ) from None
        if any(t.is_meta for t in module.state_dict().values()):
            module.to_empty(device=device)
        else:
            module.to(device)
    return model
