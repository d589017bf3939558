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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dsv.core.config import ModelConfig
from dsv.core.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
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


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (CPU); corrupt or truncated files are named."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in _weight_files(folder):
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(
                f"{f}: cannot read safetensors file (truncated or corrupt?): {exc}"
            ) from None
    return state


def _describe(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def check_state_dict(model: DSVForCausalLM, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise one error listing every missing, unexpected and mis-shaped tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k].shape)
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


# Weights the reference keeps in fp32 whatever the model dtype (router, its bias, the indexer's
# weights_proj): a bf16 checkpoint may store them in fp32.
_FP32_OK = torch.float32


def check_dtypes(state: dict[str, torch.Tensor], folder: Path) -> None:
    """Raise one error naming every tensor whose dtype cannot be a weight of this checkpoint.

    Every tensor must be floating point; when ``config.json`` names a ``torch_dtype`` (``dtype``),
    every tensor is that dtype or float32. An integer ``embed_tokens`` would load and make junk.
    """
    stored = None
    try:
        raw = json.loads((folder / "config.json").read_text())
        stored = raw.get("torch_dtype") or raw.get("dtype")
    except (OSError, ValueError):
        pass
    allowed = {getattr(torch, stored), _FP32_OK} if isinstance(stored, str) and hasattr(torch, stored) else None
    bad = [
        f"{k} ({str(t.dtype).removeprefix('torch.')})"
        for k, t in sorted(state.items())
        if not t.is_floating_point() or (allowed is not None and t.dtype not in allowed)
    ]
    if bad:
        want = "a floating-point dtype"
        if allowed is not None:
            want = f"{stored}, as config.json says" + (" (or float32)" if len(allowed) > 1 else "")
        raise CheckpointError(
            f"{folder}: {len(bad)} tensor(s) are not {want}: {_describe(bad)}; "
            "the checkpoint is damaged or was converted wrongly: write it again"
        )


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


# Models up to this many parameters get the probe forward by default (milliseconds to a second).
PROBE_MAX_PARAMETERS = 3_000_000_000


def load_pretrained(
    path_or_repo: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    with_tokenizer: bool = True,
    probe: bool | None = None,
) -> tuple[DSVForCausalLM, Tokenizer | None]:
    """Load ``(model, tokenizer)`` from a checkpoint folder or Hub repo id.

    ``dtype=None`` keeps the stored dtype. The tokenizer is None when the folder has none. Every
    tensor's dtype is checked against config.json (:func:`check_dtypes`); ``probe`` runs
    :func:`check_finite` (default: for models up to ``PROBE_MAX_PARAMETERS`` parameters), so NaN
    weights are a :class:`CheckpointError` at load instead of junk or a sampling error later.
    """
    from dsv.core.model import DSVForCausalLM
    from dsv.core.tokenizer import Tokenizer

    folder = resolve(path_or_repo)
    try:
        config = load_config(folder)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    state = read_state_dict(folder)
    with torch.device("meta"):
        model = DSVForCausalLM(config)
    check_state_dict(model, state, str(folder))
    check_dtypes(state, folder)
    target = dtype if dtype is not None else state["model.embed_tokens.weight"].dtype
    model = model.to(target)
    for moe in model.moe_layers:  # the router and its bias stay in fp32, as in the reference
        moe.gate.float()
    for block in model.blocks:
        if block.self_attn.indexer is not None:
            block.self_attn.indexer.weights_proj.float()
    # Fresh allocations on the target device, then copies: tensors handed out by the safetensors
    # reader may sit at unaligned offsets, and CPU kernels pick different (differently rounded)
    # code paths for them, which would make a resumed run drift from an uninterrupted one.
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, tensor in model.state_dict(keep_vars=True).items():
            tensor.copy_(state[name])
    model.eval()
    if probe if probe is not None else sum(t.numel() for t in state.values()) <= PROBE_MAX_PARAMETERS:
        check_finite(model, str(folder))
    tokenizer = Tokenizer.load(folder) if with_tokenizer and (folder / "tokenizer.json").exists() else None
    return model, tokenizer
