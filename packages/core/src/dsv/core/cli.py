"""``dsv model ...`` and ``dsv generate``: thin commands over dsv.core.

Registered under the ``dsv.commands`` entry-point group. torch is imported inside the commands so
``dsv --help`` stays instant. User mistakes (:class:`~dsv.core.errors.DSVError`), file-system
errors and Ctrl-C print one line and exit with the codes of :mod:`dsv.cli.errors`
(:func:`~dsv.cli.errors.user_errors`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from dsv.cli.errors import user_errors

console = Console()
err = Console(stderr=True)

model_app = typer.Typer(help="Create, inspect, download and convert checkpoints.", no_args_is_help=True)


_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
}


def parse_dtype(name: str) -> Any:
    import torch

    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of: float32, bfloat16, float16")
    return getattr(torch, _DTYPES[name])


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the spelling :func:`parse_dtype` and other engines take."""
    return str(dtype).removeprefix("torch.")


def resolve_device(name: str) -> str:
    """A ``--device`` value checked against this machine: ``auto`` is ``cuda`` when torch sees a GPU,
    else ``cpu``; ``cuda[:N]`` must exist. Raises ``ValueError`` naming the fix otherwise."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}, but torch sees no CUDA device here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}, but torch sees {torch.cuda.device_count()} CUDA device(s) (cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1})"
            )
    elif dev.type != "cpu":
        raise ValueError(f"--device {name} is not supported; use cpu or cuda[:N]")
    return name


def resolve_dtype(name: str, device: str) -> Any:
    """A ``--dtype`` value: ``auto`` is bfloat16 on a GPU and float32 on the CPU; else :func:`parse_dtype`."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return parse_dtype(name)


@model_app.command("init")
@user_errors
def init(
    out: Path = typer.Argument(..., help="Folder to write the checkpoint into."),
    preset: str = typer.Option("tiny", help="tiny | small | v32 (v32 is too large to materialise)."),
    config: Path | None = typer.Option(None, help="A config.json to use instead of a preset."),
    seed: int = typer.Option(0, help="Seed of the random initialisation."),
    dtype: str = typer.Option("float32", help="Stored dtype: float32 | bfloat16."),
    force: bool = typer.Option(False, "--force", help="Replace an existing folder."),
) -> None:
    """Write a randomly initialised checkpoint (HF layout) with a trained byte-level BPE tokenizer."""
    import torch

    from dsv.cli.errors import writable_dir
    from dsv.core.checkpoint import save_pretrained
    from dsv.core.config import ModelConfig
    from dsv.core.errors import DSVError
    from dsv.core.model import DSVForCausalLM, count_parameters
    from dsv.core.presets import preset as get_preset
    from dsv.core.tokenizer import default_corpus, train_bpe

    cfg = ModelConfig.from_json_file(config) if config is not None else get_preset(preset)
    if count_parameters(cfg)["total"] > 2e9:
        raise DSVError(f"preset {preset!r} has {count_parameters(cfg)['total'] / 1e9:.0f}B parameters; "
                       "too large to initialise here (use `dsv model info --preset` to inspect it)")  # fmt: skip
    if out.exists() and any(out.iterdir()) and not force:
        raise DSVError(f"{out} exists and is not empty; pass --force to replace it")
    # The checkpoint is written beside OUT and renamed into place: its folder must take new files.
    writable_dir(out.absolute().parent, f"OUT {out}: the folder")
    with console.status("training tokenizer"):
        tok = train_bpe(default_corpus(), cfg.vocab_size)
    torch.manual_seed(seed)
    model = DSVForCausalLM(cfg)
    save_pretrained(model, tok, out, dtype=parse_dtype(dtype))
    counts = count_parameters(cfg)
    console.print(f"wrote {out} ({cfg.model_type}, {counts['total']:,} parameters, vocab {tok.vocab_size})")


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024
    return str(n)


def model_facts(cfg: Any, context: int = 131072, bytes_per_value: int = 2) -> dict[str, str]:
    """What `dsv model info` prints: parameters, active parameters, KV bytes with/without DSA."""
    from dsv.core.inventory import count_parameters_fast

    c = count_parameters_fast(cfg)  # the same numbers as count_parameters, without building the model
    layers = cfg.num_hidden_layers
    latent = cfg.kv_latent_dim * bytes_per_value * layers
    index = (cfg.index_head_dim * bytes_per_value * layers) if cfg.has_indexer else 0
    facts = {
        "model_type": cfg.model_type,
        "layers / hidden / heads": f"{layers} / {cfg.hidden_size} / {cfg.num_attention_heads}",
        "experts": f"{cfg.n_routed_experts} routed (top-{cfg.num_experts_per_tok}) + {cfg.n_shared_experts} shared",
        "parameters (total)": f"{c['total']:,}",
        "parameters (without MTP)": f"{c['total_without_mtp']:,}",
        "active parameters per token": f"{c['active_per_token']:,}",
        "KV cache per token, dense MLA (bf16)": _fmt_bytes(latent),
    }
    if cfg.has_indexer:
        k = min(cfg.index_topk, context)
        facts["KV cache per token, DSA: latent + indexer keys (bf16)"] = _fmt_bytes(latent + index)
        facts[f"KV bytes read per decode step at {context:,} ctx, dense"] = _fmt_bytes(latent * context)
        facts[f"KV bytes read per decode step at {context:,} ctx, DSA (index keys + top-{k})"] = _fmt_bytes(
            index * context + latent * k
        )
    return facts


def _billions(n: int) -> str:
    return f"{n / 1e9:,.2f}B" if n >= 1e8 else f"{n / 1e6:,.2f}M"


def checkpoint_facts(inv: Any) -> dict[str, str]:
    """What `dsv model info FOLDER` adds about the stored tensors (a :class:`~dsv.core.inventory.CheckpointInventory`)."""
    where = "index" if inv.source == "index" else "shard headers"
    size = f", {_fmt_bytes(inv.stored_bytes)}" if inv.stored_bytes is not None else ""
    facts = {
        "stored tensors": f"{inv.tensors:,} in {inv.shards} shard(s){size} (from the {where})",
        "stored parameters": f"{inv.parameters:,} ({_billions(inv.parameters)} = {_billions(inv.main)} main + "
        f"{_billions(inv.mtp)} MTP)",
    }
    q = inv.quantization
    if q is not None:
        b0, b1 = q.weight_block_size
        facts["FP8 weights"] = (f"{inv.fp8_weights:,} in e4m3 with {b0}x{b1} block scales"
                                f"{f', scale_fmt {q.scale_fmt}' if q.scale_fmt else ''}")  # fmt: skip
    elif inv.fp8_weights:
        facts["FP8 weights"] = f"{inv.fp8_weights:,} with scales, but config.json has no quantization_config"
    if inv.mtp_absent:
        facts["MTP layers"] = "absent from the checkpoint (loads without them)"
    for label, names in (("missing tensors", inv.missing), ("unexpected tensors", inv.unexpected)):
        if names:
            more = f", ... ({len(names) - 3} more)" if len(names) > 3 else ""
            facts[label] = f"{len(names):,}: {', '.join(names[:3])}{more}"
    return facts


@model_app.command("info")
@user_errors
def info(
    path_or_repo: str = typer.Argument(
        None, help="Checkpoint folder or Hub repo id (only config.json and the index are read)."
    ),
    preset: str | None = typer.Option(None, help="Describe a preset instead (tiny | small | v32)."),
    context: int = typer.Option(131072, help="Context length for the per-step KV traffic figures."),
    as_json: bool = typer.Option(False, "--json", help="Print the facts as one JSON object."),
) -> None:
    """Parameters, active parameters per token, KV bytes per token with and without DSA; for a
    checkpoint also what it stores (tensors, parameters, FP8), from config.json and the index alone."""
    from dsv.core.checkpoint import INDEX_NAME, load_config, resolve
    from dsv.core.errors import DSVError
    from dsv.core.inventory import inventory
    from dsv.core.presets import preset as get_preset

    if (path_or_repo is None) == (preset is None):
        raise DSVError("give either a checkpoint PATH_OR_REPO or --preset NAME")
    if preset is not None:
        cfg, title = get_preset(preset), f"preset {preset}"
        facts = model_facts(cfg, context)
    else:
        folder = resolve(path_or_repo, allow_patterns=["config.json", INDEX_NAME])
        cfg, title = load_config(folder), str(path_or_repo)
        facts = model_facts(cfg, context)
        # a folder without an index is described from its shard headers (a cached repo without one
        # has no shards here: only the config's facts then)
        if (folder / INDEX_NAME).exists() or any(folder.glob("*.safetensors")):
            facts |= checkpoint_facts(inventory(folder))
    if as_json:
        print(json.dumps({"title": title, **facts}, indent=1))
        return
    table = Table(title=title, show_header=False)
    for key, value in facts.items():
        table.add_row(key, value)
    console.print(table)


@model_app.command("download")
@user_errors
def download_cmd(
    repo: str = typer.Argument(..., help="Hub repo id, e.g. deepseek-ai/DeepSeek-V3.2."),
    revision: str | None = typer.Option(None, help="Branch, tag or commit."),
) -> None:
    """Download a checkpoint into the Hugging Face cache (resumable; honours HF_HUB_OFFLINE)."""
    from dsv.core.checkpoint import download

    path = download(repo, revision=revision)
    console.print(f"{repo} -> {path}")


@user_errors
def generate(
    path: str = typer.Argument(..., help="Checkpoint folder or Hub repo id."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate."),
    temperature: float = typer.Option(1.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0),
    top_k: int = typer.Option(0),
    seed: int | None = typer.Option(None),
    presence_penalty: float = typer.Option(
        0.0, help="Lower the logit of every token already generated (-2..2)."
    ),
    frequency_penalty: float = typer.Option(0.0, help="Lower it per occurrence so far (-2..2)."),
    chat: bool = typer.Option(
        False, "--chat", help="Wrap the prompt as one user turn of the V3.2 chat format."
    ),
    thinking: bool | None = typer.Option(
        None,
        "--thinking/--no-thinking",
        help="Chat in thinking mode or not (implies --chat): the reasoning streams first, then the answer.",
    ),
    show_special: bool = typer.Option(
        False, "--show-special", help="Print the raw text, special tokens (EOS, </think>, DSML) included."
    ),
    device: str = typer.Option("cpu", help="cpu, cuda[:N] or auto (cuda when there is one)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16, float16 or auto (bfloat16 on a GPU)."),
) -> None:
    """Generate text from a checkpoint, streaming it as it is sampled."""
    import torch

    from dsv.core.checkpoint import load_pretrained
    from dsv.core.errors import DSVError
    from dsv.core.generate import SamplingParams
    from dsv.core.generate import generate as run
    from dsv.core.tokenizer import IncrementalDetokenizer

    # Settings are checked before the (possibly long) checkpoint load.
    params = SamplingParams(
        temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens, seed=seed,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
    )  # fmt: skip
    device = resolve_device(device)
    model, tok = load_pretrained(path, device=device, dtype=resolve_dtype(dtype, device))
    if tok is None:
        raise DSVError(f"{path}: the checkpoint has no tokenizer.json")
    chat = chat or thinking is not None
    if chat:
        from dsv.core.chat import encode_messages

        ids = tok.encode(encode_messages([{"role": "user", "content": prompt}], thinking=bool(thinking)))
    else:
        ids = tok.encode(prompt, add_bos=True)
    params = dataclasses.replace(params, stop_token_ids=(tok.eos_id,))
    # Special tokens stay in the decoded text when the chat parser needs them (</think>, DSML) or
    # when asked for; the parser drops them from what is printed.
    detok = IncrementalDetokenizer(tok, skip_special_tokens=not (chat or show_special))
    stream = _ChatStream(bool(thinking)) if chat and not show_special else _RawStream()

    with torch.inference_mode():
        out = run(model, ids, params, on_token=lambda t: stream.write(detok.push(t)))
    stream.write(detok.flush())
    stream.close()
    err.print(f"[dim]{len(out.tokens)} tokens, finish_reason={out.finish_reason}[/]")


class _RawStream:
    """Decoded text to stdout as it comes; ends with a newline."""

    def __init__(self) -> None:
        self.last = ""

    def write(self, text: str) -> None:
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.last = text[-1]

    def close(self) -> None:
        if self.last != "\n":
            sys.stdout.write("\n")
        sys.stdout.flush()


class _ChatStream(_RawStream):
    """Chat output through the V3.2 stream parser: reasoning (dimmed on a terminal), a blank line,
    then the answer; tool calls as one line each; special tokens never printed."""

    def __init__(self, thinking: bool) -> None:
        from dsv.core.chat import StreamParser

        super().__init__()
        self.parser = StreamParser(thinking)
        self.kind = "reasoning" if thinking else "content"
        self.printed = False
        self.tty = sys.stdout.isatty()

    def write(self, text: str) -> None:
        for ev in self.parser.feed(text):
            self._event(ev)

    def _event(self, ev: Any) -> None:
        if ev.kind != self.kind:  # reasoning -> answer (or a tool call): a blank line between them
            if self.printed:
                super().write("\n" if self.last == "\n" else "\n\n")
            self.kind = ev.kind
        self.printed = self.printed or bool(ev.text or ev.kind == "tool_call")
        if ev.kind == "tool_call":
            super().write(f"[tool call] {ev.name}({ev.arguments})\n")
        elif ev.kind == "reasoning" and self.tty and ev.text:
            sys.stdout.write(f"\x1b[2m{ev.text}\x1b[0m")
            self.last = ev.text[-1]
        else:
            super().write(ev.text)

    def close(self) -> None:
        for ev in self.parser.finish():
            self._event(ev)
        super().close()


@model_app.command("convert")
@user_errors
def convert(
    src: str = typer.Argument(..., help="Checkpoint folder or Hub repo id."),
    out: Path = typer.Argument(..., help="Folder to write the converted checkpoint into."),
    add_indexer: bool = typer.Option(
        False,
        "--add-indexer",
        help="deepseek_v3 -> deepseek_v32: add a freshly initialised lightning indexer.",
    ),
    dequantize: bool = typer.Option(
        False, "--dequantize", help="FP8 -> --dtype (bf16): dequantise every weight, drop the scales."
    ),
    quantize: str | None = typer.Option(
        None, "--quantize", help="Write DeepSeek's FP8 layout: 'fp8' (e4m3, 128x128 block scales)."
    ),
    scale_fmt: str = typer.Option(
        "float", "--scale-fmt", help="--quantize: 'float' (V3) or 'ue8m0' (power-of-two scales, V3.1/V3.2)."
    ),
    dtype: str = typer.Option(
        "bfloat16",
        "--dtype",
        help="--dequantize: output dtype; --quantize: dtype of the unquantised tensors.",
    ),
    index_n_heads: int = typer.Option(64, help="Indexer heads (V3.2: 64)."),
    index_head_dim: int = typer.Option(128, help="Indexer head dim (V3.2: 128)."),
    index_topk: int = typer.Option(2048, help="Keys each query attends to (V3.2: 2048)."),
    seed: int = typer.Option(0, help="Seed of the indexer initialisation."),
    force: bool = typer.Option(False, "--force", help="Replace an existing OUT folder."),
) -> None:
    """Convert a checkpoint: add V3.2's indexer to a V3 one, or write it in / out of DeepSeek's FP8 layout."""
    from dsv.core import convert as conv
    from dsv.core.errors import UsageError

    chosen = [flag for flag, on in (("--add-indexer", add_indexer), ("--dequantize", dequantize),
                                    ("--quantize", quantize is not None)) if on]  # fmt: skip
    if len(chosen) != 1:
        raise UsageError(
            "pass exactly one of --add-indexer, --dequantize, --quantize fp8"
            + (f" (got {' and '.join(chosen)}; run them one after the other)" if chosen else "")
        )
    try:
        torch_dtype = parse_dtype(dtype)
    except ValueError as exc:
        raise UsageError(f"--dtype: {exc}") from None
    if add_indexer:
        r = conv.add_indexer(src, out, index_n_heads=index_n_heads, index_head_dim=index_head_dim,
                             index_topk=index_topk, seed=seed, overwrite=force)  # fmt: skip
        console.print(f"wrote {r.out}: indexer added to {r.layers} layers ({r.new_parameters:,} new parameters); "
                      f"next: dsv train dsa-warmup --model {r.out} --out RUN")  # fmt: skip
        return
    if quantize is not None:
        if quantize != "fp8":
            raise UsageError(
                f"--quantize {quantize!r}: the only method is fp8 (DeepSeek's e4m3 block layout)"
            )
        if scale_fmt not in ("float", "ue8m0"):
            raise UsageError(f"--scale-fmt {scale_fmt!r}: use float or ue8m0")
        q = conv.quantize(src, out, scale_fmt=None if scale_fmt == "float" else scale_fmt, dtype=torch_dtype,
                          overwrite=force)  # fmt: skip
        console.print(f"wrote {q.out}: {q.tensors} weights in FP8 ({q.bytes_in / 2**20:,.1f} MiB -> "
                      f"{q.bytes_out / 2**20:,.1f} MiB)")  # fmt: skip
        return
    d = conv.dequantize(src, out, dtype=torch_dtype, overwrite=force)
    console.print(f"wrote {d.out}: {d.tensors} weights dequantised to {dtype_name(torch_dtype)} "
                  f"({d.bytes_in / 2**20:,.1f} MiB -> {d.bytes_out / 2**20:,.1f} MiB)")  # fmt: skip
