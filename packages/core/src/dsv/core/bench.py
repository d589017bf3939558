"""``dsv bench core``: model-level benchmarks of dsv-core.

- ``forward``: forward-pass throughput (tokens/s) of a preset, dsv versus transformers'
  ``DeepseekV32ForCausalLM`` loaded from the *same* checkpoint folder, in the same process; the
  logits are compared too, so a fast wrong answer cannot pass.
- ``decode``: time of one decode step (one new token over a cache of L tokens) for L from 1K to 32K,
  DSA versus dense attention on the same weights and the same cache. The cache is filled with
  random latents rather than by prefilling L tokens: a decode step's cost does not depend on the
  cached values, and prefilling 32K tokens on a CPU would dominate the run.

Every number is the median of ``--repeats`` timed runs after a warm-up. Results: a rich table, a
JSON file, a Markdown table and (decode) a PNG plot in ``--out``.

Run: ``dsv bench core forward --preset tiny`` / ``dsv bench core decode --layers 2`` (on a GPU:
``dsv bench core decode --device cuda --dtype bfloat16 --batch 32``).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

bench_app = typer.Typer(help="dsv-core benchmarks: forward throughput vs transformers, DSA vs dense decode.")
console = Console()


def median_times(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], object] | None = None,
) -> dict[str, float]:
    """Median wall time of each function over ``repeats`` rounds after ``warmup`` untimed rounds.

    The functions run interleaved (one of each per round), so load from other processes on a
    shared machine falls on every contender alike and the ratios stay meaningful. ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before each clock read, so queued GPU work is counted.
    """
    wait = sync or (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            wait()
            t0 = time.perf_counter()
            fn()
            wait()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def host(gpu: str = "", versions: str = "") -> str:
    """``N-core CPU (arch, Python X, torch Y)`` for a benchmark's machine line; ``gpu`` goes after
    the core count, ``versions`` (e.g. ``", transformers Z"``) after the torch version."""
    import torch

    return (
        f"{os.cpu_count()}-core CPU{gpu} ({platform.machine()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}{versions})"
    )


def machine() -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()} CPU, {torch.get_num_threads()} threads, {dev}; torch {torch.__version__}"


def _write(out: Path, name: str, rows: list[dict], markdown: str) -> None:
    from dsv.core.checkpoint import atomic_write_bytes, atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{name}.json", {"machine": machine(), "rows": rows})
    atomic_write_bytes(out / f"{name}.md", markdown.encode())


@bench_app.command("forward")
def forward(
    preset: list[str] = typer.Option(["tiny", "small"], help="Presets to measure."),
    seq: int = typer.Option(256, help="Sequence length."),
    batch: int = typer.Option(1, help="Batch size."),
    repeats: int = typer.Option(5, help="Timed runs (median reported)."),
    layers: int | None = typer.Option(None, help="Override num_hidden_layers (keeps the run short)."),
    out: Path = typer.Option(Path("bench-out"), help="Folder for JSON/Markdown results."),
) -> None:
    """Forward throughput, dsv vs transformers on the same checkpoint (ratio in the same run)."""
    import tempfile

    import torch

    from dsv.core.checkpoint import load_pretrained, save_pretrained
    from dsv.core.model import DSVForCausalLM
    from dsv.core.presets import preset as get_preset

    try:
        import transformers
    except ImportError:
        console.print(
            "[red]error:[/] the forward benchmark compares against transformers: pip install transformers"
        )
        raise typer.Exit(1) from None
    transformers.logging.set_verbosity_error()
    rows = []
    for name in preset:
        cfg = get_preset(name)
        if layers is not None:
            cfg = cfg.replace(num_hidden_layers=layers)
        cfg = cfg.replace(num_nextn_predict_layers=0)
        with tempfile.TemporaryDirectory() as tmp:
            torch.manual_seed(0)
            save_pretrained(DSVForCausalLM(cfg), None, Path(tmp) / "m")
            ours, _ = load_pretrained(Path(tmp) / "m")
            theirs = transformers.AutoModelForCausalLM.from_pretrained(
                Path(tmp) / "m", dtype=torch.float32
            ).eval()
            x = torch.randint(0, cfg.vocab_size, (batch, seq))
            with torch.inference_mode():
                err = (ours(x).logits - theirs(x).logits).abs().max().item()
                t = median_times({"dsv": partial(ours, x), "hf": partial(theirs, x)}, repeats)
                t_ours, t_hf = t["dsv"], t["hf"]
        tokens = batch * seq
        rows.append(
            {
                "preset": name, "layers": cfg.num_hidden_layers, "batch": batch, "seq": seq,
                "dsv_tok_s": tokens / t_ours, "hf_tok_s": tokens / t_hf, "ratio": t_hf / t_ours, "max_abs_logit_diff": err,
            }
        )  # fmt: skip
    table = Table(title=f"forward throughput ({machine()})")
    for col in (
        "preset",
        "layers",
        "batch x seq",
        "dsv tok/s",
        "transformers tok/s",
        "dsv / transformers",
        "max |Δlogit|",
    ):
        table.add_column(col)
    md = [
        "| preset | layers | batch x seq | dsv tok/s | transformers tok/s | ratio | max abs logit diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r["preset"], str(r["layers"]), f"{r['batch']}x{r['seq']}", f"{r['dsv_tok_s']:,.0f}",
                 f"{r['hf_tok_s']:,.0f}", f"{r['ratio']:.2f}x", f"{r['max_abs_logit_diff']:.1e}"]  # fmt: skip
        table.add_row(*cells)
        md.append("| " + " | ".join(cells) + " |")
    console.print(table)
    _write(out, "core-forward", rows, "\n".join(md) + "\n")


@bench_app.command("decode")
def decode(
    preset: str = typer.Option("small", help="Preset whose attention/indexer dims are used."),
    layers: int = typer.Option(2, help="num_hidden_layers (the per-layer cost is what scales with context)."),
    contexts: list[int] = typer.Option([1024, 2048, 4096, 8192, 16384, 32768], help="Cached tokens."),
    repeats: int = typer.Option(5, help="Timed runs (median reported)."),
    batch: int = typer.Option(1, min=1, help="Sequences decoded together (tokens/s counts all of them)."),
    device: str = typer.Option("cpu", help="cpu, cuda[:N] or auto."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or auto (weights and cache)."),
    out: Path = typer.Option(Path("bench-out"), help="Folder for JSON/Markdown/PNG results."),
) -> None:
    """Decode-step time and tokens/s vs context, DSA vs dense attention on the same weights and cache."""
    import torch

    from dsv.core.cache import DenseKVCache
    from dsv.core.cli import resolve_device, resolve_dtype
    from dsv.core.model import DSVForCausalLM
    from dsv.core.model.rope import Rotary
    from dsv.core.presets import preset as get_preset

    try:
        device = resolve_device(device)
        dt = resolve_dtype(dtype, device)
    except ValueError as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(2) from None
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    cfg = get_preset(preset).replace(num_hidden_layers=layers, num_nextn_predict_layers=0)
    cfg = cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, max(contexts) + 8))
    torch.manual_seed(0)
    model = DSVForCausalLM(cfg).to(device=device, dtype=dt).eval()
    hidden = torch.randn(batch, 1, cfg.hidden_size, device=device, dtype=dt)
    rows = []
    for ctx in contexts:
        cache = DenseKVCache(cfg, batch, ctx + 1, device=device, dtype=dt)
        cache.kv.normal_()
        if cache.index_k is not None:
            cache.index_k.normal_()
        token = torch.randint(0, cfg.vocab_size, (batch, 1), device=device)

        def step(
            sparse: bool, cache: DenseKVCache = cache, ctx: int = ctx, token: torch.Tensor = token
        ) -> None:
            cache._offsets.fill_(ctx)  # rewind: every timed step decodes token ctx+1
            model(token, cache=cache, use_sparse=sparse)

        def attn(sparse: bool, cache: DenseKVCache = cache, ctx: int = ctx) -> None:
            # one attention layer alone (indexer + selection + attention): the part that scales with context
            cache._offsets.fill_(ctx)
            rope = Rotary.at(cfg, cache._offsets.view(batch, 1), model.inv_freq)
            model.blocks[0].self_attn(hidden, rope, cache._offsets, layer=0, cache=cache, use_sparse=sparse)

        with torch.inference_mode():
            t = median_times(
                {
                    "step_dense": partial(step, False),
                    "step_dsa": partial(step, True),
                    "attn_dense": partial(attn, False),
                    "attn_dsa": partial(attn, True),
                },
                repeats,
                sync=sync,
            )
            t_dense, t_dsa, a_dense, a_dsa = t["step_dense"], t["step_dsa"], t["attn_dense"], t["attn_dsa"]
        rows.append(
            {
                "context": ctx, "dense_ms": t_dense * 1e3, "dsa_ms": t_dsa * 1e3, "speedup": t_dense / t_dsa,
                "attn_dense_ms": a_dense * 1e3, "attn_dsa_ms": a_dsa * 1e3, "attn_speedup": a_dense / a_dsa,
                "dense_tok_s": batch / t_dense, "dsa_tok_s": batch / t_dsa,
            }
        )  # fmt: skip
        console.print(
            f"context {ctx:>6}: step dense {t_dense * 1e3:8.2f} ms  DSA {t_dsa * 1e3:8.2f} ms ({t_dense / t_dsa:.2f}x) | "
            f"attention layer dense {a_dense * 1e3:8.2f} ms  DSA {a_dsa * 1e3:8.2f} ms ({a_dense / a_dsa:.2f}x)"
        )
    md = [
        f"Decode step, preset `{preset}` dims with {layers} layers, index_topk={cfg.index_topk}, {dtype}, "
        f"batch {batch}, on {device} ({machine()}). `step` is the whole model forward for one new token "
        "per sequence (tokens/s = batch / step time); `attention layer` is one MLA layer alone (for DSA: "
        "indexer scores over the whole context + top-k + attention over the selection).",
        "",
        "| context | step dense (ms) | step DSA (ms) | dense / DSA | decode tok/s dense | decode tok/s DSA "
        "| attention layer dense (ms) | attention layer DSA (ms) | dense / DSA |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    md += [
        f"| {r['context']:,} | {r['dense_ms']:.2f} | {r['dsa_ms']:.2f} | {r['speedup']:.2f}x "
        f"| {r['dense_tok_s']:,.1f} | {r['dsa_tok_s']:,.1f} "
        f"| {r['attn_dense_ms']:.2f} | {r['attn_dsa_ms']:.2f} | {r['attn_speedup']:.2f}x |"
        for r in rows
    ]
    _write(out, "core-decode", rows, "\n".join(md) + "\n")
    _plot_decode(rows, out / "core-decode.png", cfg.index_topk)


def _plot_decode(rows: list[dict], path: Path, topk: int) -> None:
    from dsv.core.plot import pyplot, save_png

    plt = pyplot()
    if plt is None:
        console.print("[yellow]matplotlib not installed: no plot written[/]")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ctx = [r["context"] for r in rows]
    ax.plot(ctx, [r["dense_ms"] for r in rows], "o-", label="model step, dense MLA")
    ax.plot(ctx, [r["dsa_ms"] for r in rows], "s-", label=f"model step, DSA (top-{topk})")
    ax.plot(ctx, [r["attn_dense_ms"] for r in rows], "o--", label="one attention layer, dense")
    ax.plot(ctx, [r["attn_dsa_ms"] for r in rows], "s--", label="one attention layer, DSA")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cached tokens")
    ax.set_ylabel("time per decoded token (ms)")
    ax.set_title("Decode step time vs context")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path, dpi=120)
