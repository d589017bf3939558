"""Hugging Face checkpoint folders: save, load, download.

Layout (what deepseek-ai/DeepSeek-V3.2 ships, and what transformers reads):
``config.json``, ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``,
``generation_config.json``, ``tokenizer.json`` (+ ``tokenizer_config.json``). Tensor names are the
Hub's, i.e. :class:`~dsv.core.model.DSVForCausalLM`'s own ``state_dict`` keys.

Saving is atomic: everything is written into a temporary sibling folder (each file fsync'd) that
is renamed into place, so an interrupted save never leaves a half-written checkpoint where a good
one was. Loading checks every tensor: missing, unexpected or mis-shaped tensors are listed in one
:class:`~dsv.core.errors.CheckpointError`; a truncated or corrupt safetensors file is named.

A repo id (``owner/name``) is resolved through ``huggingface_hub.snapshot_download``, which honours
``HF_HUB_OFFLINE`` and the local cache.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dsv.core.config import ModelConfig
from dsv.core.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from dsv.core.device_map import DevicePlan
    from dsv.core.model import DSVForCausalLM
    from dsv.core.tokenizer import Tokenizer

DEFAULT_SHARD_BYTES = 2 * 1024**3
INDEX_NAME = "model.safetensors.index.json"


# ----------------------------------------------------------------------------- atomic files


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsync'd temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(root)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a fully written folder ``tmp`` to ``out``, replacing an old one without a window where
    neither exists (the old folder is renamed aside first and removed last)."""
    _fsync_tree(tmp)
    backup = None
    if out.exists():
        backup = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, backup)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


# ----------------------------------------------------------------------------- save


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def write_weights(
    folder: Path, state: dict[str, torch.Tensor], *, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> None:
    """Write sharded safetensors + index into ``folder`` (not atomic by itself: use a temp folder)."""
    from safetensors.torch import save_file

    shards = _shards(state, max_shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in shard.items()},
            str(folder / fname),
            metadata={"format": "pt"},
        )
        for k, v in shard.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def generation_config(config: ModelConfig) -> dict[str, Any]:
    return {
        "_from_model_config": True,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 0.95,
    }


def save_pretrained(
    model: DSVForCausalLM,
    tokenizer: Tokenizer | None,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = True,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Save a Hugging Face checkpoint folder atomically; returns the folder."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another folder or allow overwriting")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        state = {
            k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
            for k, v in model.state_dict().items()
        }
        write_weights(tmp, state, max_shard_bytes=max_shard_bytes)
        cfg = model.config.to_hf_dict()
        first = next(iter(state.values()))
        cfg["torch_dtype"] = str(first.dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps(generation_config(model.config), indent=2) + "\n"
        )
        if tokenizer is not None:
            tokenizer.save(tmp)
        for name, data in (extra_files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------- resolve / download


def is_repo_id(spec: str) -> bool:
    """``owner/name`` that is not an existing local path."""
    return not Path(spec).exists() and spec.count("/") == 1 and not spec.startswith((".", "/", "~"))


def resolve(path_or_repo: str | Path, *, allow_patterns: list[str] | None = None) -> Path:
    """A local checkpoint folder for ``path_or_repo`` (downloading or reading the Hub cache for a repo id)."""
    spec = str(path_or_repo)
    if not is_repo_id(spec):
        path = Path(spec).expanduser()
        if not path.exists():
            raise CheckpointError(f"{path}: no such folder (and not a Hub repo id of the form owner/name)")
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a checkpoint folder, got a file")
        return path
    return Path(download(spec, allow_patterns=allow_patterns))


def download(repo_id: str, *, revision: str | None = None, allow_patterns: list[str] | None = None) -> str:
    """Download (or find in the cache) a Hub repo; a clear error when offline and not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns)
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        why = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "the Hub could not be reached"
        raise CheckpointError(
            f"{repo_id}: not in the local Hugging Face cache and {why}; "
            f"run `dsv model download {repo_id}` with network access, or pass a local folder"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo_id}: no such repository on the Hub (or it is private: log in first)"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise CheckpointError(f"{repo_id}: download failed: {exc}") from None


# ----------------------------------------------------------------------------- load


def load_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder}: no config.json (is this a checkpoint folder?)")
    return ModelConfig.from_json_file(path)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).exists()]
        if missing:
            raise CheckpointError(
                f"{folder}: the index lists shard(s) that are missing: {', '.join(missing)}"
            )
        return [folder / f for f in files]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights found")
    return files


def _unreadable(f: Path, exc: BaseException) -> CheckpointError:
    return CheckpointError(f"{f}: cannot read safetensors file (truncated or corrupt?): {exc}")


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder as stored (CPU; FP8 weights and their ``*_scale_inv``
    stay as they are); corrupt or truncated files are named."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(folder):
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise _unreadable(f, exc) from None
    return state


@dataclass(frozen=True)
class TensorMeta:
    """Where a stored tensor lives and what it is, read from the safetensors header only."""

    file: Path
    dtype: torch.dtype | None  # None: a dtype torch cannot hold (named in ``stored``)
    shape: tuple[int, ...]
    stored: str  # the safetensors dtype name ("BF16", "F8_E4M3", ...)


_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def tensor_index(folder: Path) -> dict[str, TensorMeta]:
    """Every tensor's file, dtype and shape from the shards' headers (no tensor data is read)."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, TensorMeta] = {}
    for f in _weight_files(folder):
        try:
            with safe_open(str(f), framework="pt") as sf:
                for name in sf.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    sl = sf.get_slice(name)
                    stored = sl.get_dtype()
                    out[name] = TensorMeta(f, _ST_DTYPES.get(stored), tuple(sl.get_shape()), stored)
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise _unreadable(f, exc) from None
    return out


def _describe(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], source: str) -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    misshaped = [
        f"{k} (checkpoint {found[k]}, model {expected[k]})"
        for k in sorted(set(expected) & set(found))
        if found[k] != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_describe(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_describe(unexpected)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped tensor(s): {_describe(misshaped)}")
    if problems:
        raise CheckpointError(f"{source}: weights do not match config.json: " + "; ".join(problems))


def check_state_dict(model: DSVForCausalLM, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise one error listing every missing, unexpected and mis-shaped tensor."""
    _check_shapes(
        {k: tuple(v.shape) for k, v in model.state_dict().items()},
        {k: tuple(v.shape) for k, v in state.items()},
        source,
    )


# Weights the reference keeps in fp32 whatever the model dtype (router, its bias, the indexer's
# weights_proj): a bf16 checkpoint may store them in fp32.
_FP32_OK = torch.float32


def _raw_config(folder: Path) -> dict[str, Any]:
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _check_dtypes(dtypes: dict[str, tuple[torch.dtype | None, str]], folder: Path, fp8: set[str]) -> None:
    stored = None
    raw = _raw_config(folder)
    stored = raw.get("torch_dtype") or raw.get("dtype")
    allowed = {getattr(torch, stored), _FP32_OK} if isinstance(stored, str) and hasattr(torch, stored) else None
    bad = []
    for k, (dt, name) in sorted(dtypes.items()):
        if k in fp8:
            continue  # FP8 weights and their scales are checked by fp8_pairs
        if dt is None or not dt.is_floating_point or dt in (torch.float8_e4m3fn, torch.float8_e5m2):
            bad.append(f"{k} ({name if dt is None else str(dt).removeprefix('torch.')})")
        elif allowed is not None and dt not in allowed:
            bad.append(f"{k} ({str(dt).removeprefix('torch.')})")
    if bad:
        want = "a floating-point dtype"
        if allowed is not None:
            want = f"{stored}, as config.json says" + (" (or float32)" if len(allowed) > 1 else "")
        raise CheckpointError(
            f"{folder}: {len(bad)} tensor(s) are not {want}: {_describe(bad)}; "
            "the checkpoint is damaged or was converted wrongly: write it again"
        )


def check_dtypes(state: dict[str, torch.Tensor], folder: Path) -> None:
    """Raise one error naming every tensor whose dtype cannot be a weight of this checkpoint.

    Every tensor must be floating point; when ``config.json`` names a ``torch_dtype`` (``dtype``),
    every tensor is that dtype or float32. An integer ``embed_tokens`` would load and make junk.
    """
    _check_dtypes({k: (t.dtype, str(t.dtype)) for k, t in state.items()}, folder, set())


def fp8_pairs(index: dict[str, TensorMeta], folder: Path) -> tuple[dict[str, str], tuple[int, int]]:
    """``{weight name: scale name}`` of the FP8 weights and the block size, checked against
    ``quantization_config``: an FP8 weight without its scale, a scale without its weight or of the
    wrong shape, or FP8 tensors without a supported ``quantization_config`` raise one error."""
    from dsv.core.fp8 import SCALE_SUFFIX, Fp8Config, scale_shape

    raw = _raw_config(folder)
    qc = raw.get("quantization_config")
    config = Fp8Config.from_hf(qc, f"{folder}/config.json") if qc is not None else None
    fp8 = {k for k, m in index.items() if m.stored in ("F8_E4M3", "F8_E5M2")}
    scales = {k for k in index if k.endswith(SCALE_SUFFIX)}
    if not fp8 and not scales:
        return {}, (config.weight_block_size if config else (0, 0))
    if config is None:
        raise CheckpointError(
            f"{folder}: {len(fp8)} tensor(s) are stored in FP8 ({_describe(sorted(fp8), 3)}) but config.json "
            "has no quantization_config; add the one the checkpoint was made with "
            '({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], ...})'
        )
    block = config.weight_block_size
    problems = []
    if any(index[k].stored != "F8_E4M3" for k in fp8):
        problems.append("FP8 tensors must be e4m3 (float8_e4m3fn)")
    no_scale = sorted(k for k in fp8 if k + SCALE_SUFFIX not in index)
    if no_scale:
        problems.append(f"{len(no_scale)} FP8 weight(s) without their {SCALE_SUFFIX}: {_describe(no_scale)}")
    orphans = sorted(s for s in scales if s.removesuffix(SCALE_SUFFIX) not in fp8)
    if orphans:
        problems.append(f"{len(orphans)} scale(s) without an FP8 weight: {_describe(orphans)}")
    bad = []
    for k in sorted(fp8 - set(no_scale)):
        s, shape = index[k + SCALE_SUFFIX], index[k].shape
        want = scale_shape(shape, block) if len(shape) == 2 else None
        if s.shape != want or s.stored != "F32":
            bad.append(f"{k + SCALE_SUFFIX} ({s.stored} {s.shape}, want F32 {want})")
    if bad:
        problems.append(
            f"{len(bad)} scale(s) of the wrong shape or dtype for weight_block_size {list(block)}: {_describe(bad)}"
        )
    if problems:
        raise CheckpointError(f"{folder}: FP8 weights do not match their scales: " + "; ".join(problems))
    return {k: k + SCALE_SUFFIX for k in sorted(fp8)}, block


def check_finite(model: DSVForCausalLM, source: str) -> None:
    """Raise when a forward on a short probe batch is not finite (NaN or inf weights, overflow)."""
    ids = torch.arange(8, device=next(model.parameters()).device).remainder(model.config.vocab_size)[None]
    with torch.inference_mode():
        logits = model(ids).logits
    if not bool(torch.isfinite(logits).all()):
        bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
        why = (
            f"non-finite weights in {_describe(bad)}; the checkpoint is damaged: write it again"
            if bad
            else "the forward overflows in this dtype; load it in float32 (--dtype float32)"
        )
        raise CheckpointError(f"{source}: the model's outputs on a probe batch are not finite ({why})")


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device``: CUDA's free memory, or the host's
    ``MemAvailable`` plus free swap; None when it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return (int(info["MemAvailable"].split()[0]) + int(info.get("SwapFree", "0 kB").split()[0])) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _check_fits(
    model: DSVForCausalLM, device: torch.device, source: str, device_map: DevicePlan | None = None
) -> None:
    need: dict[torch.device, int] = {}
    for name, t in model.state_dict().items():
        try:
            where = device if device_map is None else torch.device(device_map.device_of(name))
        except KeyError:
            raise CheckpointError(
                f"{source}: the device_map has no place for {name}; make the plan from this checkpoint's config"
            ) from None
        need[where] = need.get(where, 0) + t.numel() * t.element_size()
    for where, n in need.items():
        free = available_bytes(where)
        if free is not None and n > free:
            gib = 1024**3
            dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")
            raise CheckpointError(
                f"{source}: the model needs {n / gib:.1f} GiB in {dtype} on {where}, but only "
                f"{free / gib:.1f} GiB is free there; load it in a smaller dtype (--dtype bfloat16), "
                "on a device with more memory, or free some"
            )


def _without_mtp(config: ModelConfig, index: dict[str, TensorMeta], folder: Path) -> bool:
    """Whether the checkpoint has none of the MTP layers config.json counts, as every checkpoint
    saved by transformers (which has no MTP module) does: then it loads without them, said once.
    A checkpoint with some of their tensors keeps the missing-tensor error."""
    n = config.num_nextn_predict_layers
    if n == 0:
        return False
    prefixes = tuple(f"model.layers.{config.num_hidden_layers + i}." for i in range(n))
    if any(k.startswith(prefixes) for k in index):
        return False
    import warnings

    warnings.warn(
        f"{folder}: config.json has num_nextn_predict_layers: {n} but the weights hold no MTP layer "
        f"({prefixes[0]}*), as in checkpoints saved by transformers; loading without the MTP module",
        stacklevel=3,
    )
    return True


def _cast(model: DSVForCausalLM, dtype: torch.dtype) -> DSVForCausalLM:
    """``model`` in ``dtype``, except the router and the indexer's ``weights_proj``, which stay in
    fp32 as in the reference."""
    model = model.to(dtype)
    # The MTP layer routes and selects keys like a main block, so its router and indexer too.
    for moe in [*model.moe_layers, *model.mtp_moe_layers]:
        moe.gate.float()
    for block in [*model.blocks, *model.mtp_layers]:
        if block.self_attn.indexer is not None:
            block.self_attn.indexer.weights_proj.float()
    return model


# Models up to this many parameters get the probe forward by default (milliseconds to a second).
PROBE_MAX_PARAMETERS = 3_000_000_000


def load_pretrained(
    path_or_repo: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    with_tokenizer: bool = True,
    probe: bool | None = None,
    device_map: DevicePlan | None = None,
) -> tuple[DSVForCausalLM, Tokenizer | None]:
    """Load ``(model, tokenizer)`` from a checkpoint folder or Hub repo id.

    ``dtype=None`` keeps the stored dtype (bf16 for an FP8 checkpoint). The model is built on the
    meta device, checked against the shards' headers (names, shapes, dtypes, FP8 scales) before
    any tensor is read, allocated once on ``device`` (an error says so when it cannot fit), and
    filled shard by shard: FP8 weights are dequantised (:func:`dsv.core.fp8.dequantize_fp8`) one
    tensor at a time, so host memory peaks at about the model plus one shard. ``probe`` runs
    :func:`check_finite` (default: for models up to ``PROBE_MAX_PARAMETERS`` parameters), so NaN
    weights are a :class:`CheckpointError` at load instead of junk or a sampling error later.

    ``device_map`` (a :func:`dsv.core.device_map.plan_device_map` plan) places each unit on its own
    device instead of ``device``, each device checked for room first. The model's forward does not
    move activations between devices yet, so a plan over several devices loads without the probe.
    """
    from safetensors import SafetensorError, safe_open

    from dsv.core.fp8 import dequantize_fp8
    from dsv.core.model import DSVForCausalLM
    from dsv.core.tokenizer import Tokenizer

    folder = resolve(path_or_repo)
    try:
        config = load_config(folder)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    with torch.device("meta"):
        model = DSVForCausalLM(config)
    device = torch.device(device)
    stored = _raw_config(folder).get("torch_dtype")
    estimate = dtype
    if estimate is None and isinstance(stored, str) and isinstance(getattr(torch, stored, None), torch.dtype):
        estimate = getattr(torch, stored)  # an FP8 checkpoint says bfloat16: what its other tensors are
    if estimate is not None:  # before any shard is opened: a model that cannot fit fails at once
        _check_fits(_cast(model, estimate), device, str(folder), device_map)
    index = tensor_index(folder)
    if _without_mtp(config, index, folder):
        config = config.replace(num_nextn_predict_layers=0)
        with torch.device("meta"):
            model = DSVForCausalLM(config)
    pairs, block = fp8_pairs(index, folder)
    scales = set(pairs.values())
    _check_shapes(
        {k: tuple(v.shape) for k, v in model.state_dict().items()},
        {k: m.shape for k, m in index.items() if k not in scales},
        str(folder),
    )
    _check_dtypes({k: (m.dtype, m.stored) for k, m in index.items()}, folder, set(pairs) | scales)
    target = dtype if dtype is not None else index["model.embed_tokens.weight"].dtype
    assert target is not None
    model = _cast(model, target)
    if target != estimate:
        _check_fits(model, device, str(folder), device_map)
    # Fresh allocations on the target device, then copies: tensors handed out by the safetensors
    # reader may sit at unaligned offsets, and CPU kernels pick different (differently rounded)
    # code paths for them, which would make a resumed run drift from an uninterrupted one.
    if device_map is None:
        model = model.to_empty(device=device)
    else:
        from dsv.core.device_map import DevicePlan, place

        present = {name for name, _ in model.named_modules()}  # an absent MTP layer has no unit
        units = {u: d for u, d in device_map.units.items() if u in present}
        model = place(model, DevicePlan(units=units, bytes=device_map.bytes))
        if len(set(units.values())) > 1:
            probe = False
    params = model.state_dict(keep_vars=True)
    by_file: dict[Path, list[str]] = {}
    for name in params:
        by_file.setdefault(index[name].file, []).append(name)
    with torch.no_grad():
        for f, names in by_file.items():
            # One shard mapped at a time; each tensor is read, converted and dropped in turn.
            try:
                with safe_open(str(f), framework="pt") as sf:
                    for name in names:
                        tensor = sf.get_tensor(name)
                        if name in pairs:
                            scale_meta = index[pairs[name]]
                            if scale_meta.file == f:
                                scale = sf.get_tensor(pairs[name])
                            else:
                                with safe_open(str(scale_meta.file), framework="pt") as other:
                                    scale = other.get_tensor(pairs[name])
                            tensor = dequantize_fp8(tensor, scale, block, dtype=params[name].dtype, name=name)
                        params[name].copy_(tensor)
                        del tensor
            except (SafetensorError, OSError) as exc:
                raise _unreadable(f, exc) from None
    model.eval()
    n_params = sum(t.numel() for t in params.values())
    if probe if probe is not None else n_params <= PROBE_MAX_PARAMETERS:
        check_finite(model, str(folder))
    tokenizer = Tokenizer.load(folder) if with_tokenizer and (folder / "tokenizer.json").exists() else None
    return model, tokenizer
