"""``dsv bench serve``: serving throughput and time to first token, dsv-serve versus transformers.

For each preset a random checkpoint is written (``small`` cut to ``--small-layers`` layers so it
runs on a CPU). For each request shape ``--shape PxN`` (P prompt tokens, N output tokens; default
a short ``32x32`` and a chat-like ``512x128``) and each client count C, in ONE run:

Every run sends fresh random prompts (the same ones to every side), so no run is helped by the
prefix cache holding an earlier run's prompts.

- **dsv**: a ``dsv serve`` process on 127.0.0.1 (native engine: continuous batching, paged cache,
  staged decode) and C concurrent streaming clients on ``/v1/completions``, driven by
  :mod:`dsv.serve.loadgen` in its own process (raw sockets, no JSON decoding per event, so the
  client costs the shared cores as little as possible). Each client sends its own P random token
  ids (distinct, so the prefix cache does not help) and asks for N greedy tokens. Output tokens/s
  = completion tokens (from the usage event) / wall time of the wave; TTFT = request sent to the
  first streamed event.
- **dsv engine**: the same checkpoint in an in-process :class:`~dsv.serve.engine.Engine` (no HTTP),
  the same C requests submitted at once: what the HTTP layer costs is the difference.
- **transformers**: ``AutoModelForCausalLM`` (``DeepseekV32ForCausalLM``) on the same folder,
  ``generate`` on one batch of the same C prompts (equal lengths, so no padding is needed; the mask
  is passed), greedy, exactly N new tokens. Its TTFT is the time of the same batch with one new
  token (measured in the first run of a cell): with static batching every client waits for the
  whole prefill.

Both sides get ``--threads`` torch threads and the same glibc allocator settings
(:func:`dsv.core.allocator.tune_cpu_allocator`, which ``dsv serve`` applies to its engine). Each
cell is the median of ``--runs`` runs (after one warm-up). ``--write FILE`` writes the Markdown
section (atomically).

Run: ``dsv bench serve --runs 3 --write tools/bench/results/serve.md``.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from dsv.serve.loadgen import percentile

__all__ = ["bench_serve", "plot_serve"]

console = Console()


def _make_checkpoint(name: str, layers: int | None, folder: Path) -> Any:
    import torch

    from dsv.core.checkpoint import save_pretrained
    from dsv.core.model import DSVForCausalLM
    from dsv.core.presets import preset
    from dsv.core.tokenizer import default_corpus, train_bpe

    cfg = preset(name).replace(num_nextn_predict_layers=0)
    if layers is not None:
        cfg = cfg.replace(num_hidden_layers=layers)
    torch.manual_seed(0)
    save_pretrained(DSVForCausalLM(cfg), train_bpe(default_corpus(), cfg.vocab_size), folder)
    return cfg


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    # Above the special tokens; distinct rows so no two clients share a cached prefix.
    return torch.randint(16, vocab, (n, length), generator=g).tolist()


def _start_server(
    folder: Path, threads: int, max_batch: int, max_len: int, device: str, dtype: str
) -> tuple[subprocess.Popen[bytes], str]:
    import httpx

    from dsv.serve.launch import free_port

    # This interpreter's own dsv: a `dsv` found on PATH may belong to another environment.
    cmd = [sys.executable, "-m", "dsv.cli.main"]
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(
        [*cmd, "serve", str(folder), "--port", str(port), "--model-name", "m", "--max-batch", str(max_batch),
         "--max-model-len", str(max(2048, max_len)), "--device", device, "--dtype", dtype],
        env=env, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"dsv serve exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            proc.terminate()
            raise TimeoutError("dsv serve did not start in 300 s")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)


def _dsv_wave(url: str, prompts: list[list[int]], max_tokens: int, folder: Path) -> dict[str, float]:
    """One wave from the load generator process (its own interpreter, so its own GIL)."""
    path = folder / "prompts.json"
    path.write_text(json.dumps(prompts))
    cmd = [sys.executable, "-m", "dsv.serve.loadgen", url, str(path), str(max_tokens)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def _engine_wave(engine: Any, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
    """The same wave straight into an in-process engine: tokens/s without HTTP."""
    import threading

    from dsv.serve.engine import Finish, GenParams

    lock, done = threading.Lock(), threading.Event()
    state = {"left": len(prompts), "tokens": 0}
    first: dict[int, float] = {}
    t0 = time.perf_counter()

    def on_event(i: int) -> Any:
        def cb(ev: Any) -> None:
            if i not in first:
                first[i] = time.perf_counter() - t0
            if isinstance(ev, Finish):
                with lock:
                    state["left"] -= 1
                    state["tokens"] += ev.completion_tokens
                    if state["left"] == 0:
                        done.set()

        return cb

    for i, p in enumerate(prompts):
        engine.submit(p, GenParams(temperature=0.0, max_tokens=max_tokens), on_event(i))
    done.wait()
    wall = time.perf_counter() - t0
    ttfts = list(first.values())
    return {"tok_s": state["tokens"] / wall, "ttft_p50": percentile(ttfts, 0.5),
            "ttft_p99": percentile(ttfts, 0.99), "tokens": state["tokens"]}  # fmt: skip


def _hf_wave(
    model: Any, prompts: list[list[int]], max_tokens: int, pad_id: int, ttft: bool
) -> dict[str, float]:
    import torch

    ids = torch.tensor(prompts, device=model.device)
    mask = torch.ones_like(ids)
    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    kw = {"attention_mask": mask, "do_sample": False, "pad_token_id": pad_id}
    out: dict[str, float] = {}
    with torch.inference_mode():
        if ttft:
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
            sync()
            out["ttft_p50"] = out["ttft_p99"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        gen = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, **kw)
        sync()
        wall = time.perf_counter() - t0
    tokens = (gen.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"tok_s": tokens / wall, "tokens": tokens, **out}


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    if not runs:
        return {}
    return {k: statistics.median(r[k] for r in runs if k in r) for k in runs[0]}


def _parse_shape(text: str) -> tuple[int, int]:
    try:
        p, n = (int(x) for x in text.lower().split("x"))
    except ValueError:
        p = n = 0
    if p < 1 or n < 1:
        print(f"error: --shape {text!r} is not PROMPTxOUTPUT with two positive integers (e.g. 512x128)",
              file=sys.stderr)  # fmt: skip
        raise typer.Exit(2)
    return p, n


def bench_serve(
    preset: list[str] = typer.Option(["tiny", "small"], help="Presets to measure."),
    small_layers: int = typer.Option(2, help="Layers kept for the small preset (CPU feasibility)."),
    clients: list[int] = typer.Option([1, 8, 32], help="Concurrent clients (transformers batch size)."),
    shape: list[str] = typer.Option(
        ["32x32", "512x128"], help="Request shapes PROMPTxOUTPUT tokens per client (short and chat-like)."
    ),
    runs: int = typer.Option(3, help="Timed runs per cell (median reported)."),
    engine_alone: bool = typer.Option(True, help="Also time the in-process engine without HTTP."),
    threads: int = typer.Option(1, help="Torch threads for both sides."),
    device: str = typer.Option("cpu", help="Where every side runs: cpu, cuda[:N] or auto."),
    dtype: str = typer.Option("auto", help="Weights and cache of every side: float32, bfloat16 or auto."),
    write: Path = typer.Option(None, help="Write the Markdown results section to this file."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON (for scripts) instead of the table."),
) -> None:
    """Serving output tokens/s and TTFT per shape and client count: dsv serve versus transformers generate.

    The console table keeps to 80 columns (tokens/s and TTFT in seconds, C clients); ``--write``
    has every column, with each run's figures, and ``--json`` every number."""
    if runs < 1 or any(c < 1 for c in clients):
        print("error: --runs and --clients must be positive", file=sys.stderr)
        raise typer.Exit(2)
    shapes = [_parse_shape(x) for x in shape]
    import torch
    import transformers
    from rich.progress import Progress

    from dsv.core.allocator import tune_cpu_allocator
    from dsv.core.bench import host
    from dsv.core.checkpoint import atomic_write_bytes, load_pretrained
    from dsv.core.cli import dtype_name, resolve_device, resolve_dtype
    from dsv.serve.engine import Engine

    try:
        device = resolve_device(device)
        dt = resolve_dtype(dtype, device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2) from None

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    # The served engine runs with these allocator settings; transformers (and the in-process engine)
    # get the same ones in this process, so no side is measured with a different allocator.
    tuned = tune_cpu_allocator()
    load_before = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    longest = max(p + n for p, n in shapes)
    seeds = itertools.count(1)
    # With --json, stdout carries the JSON alone: progress and file notes go to stderr.
    out = Console(stderr=True) if as_json else console
    with tempfile.TemporaryDirectory() as tmp, Progress(console=out) as progress:
        task = progress.add_task("bench serve", total=len(preset) * len(shapes) * len(clients) * runs * 3)
        for name in preset:
            folder = Path(tmp) / name
            cfg = _make_checkpoint(name, small_layers if name == "small" else None, folder)
            proc, url = _start_server(folder, threads, max(clients), longest, device, dtype_name(dt))
            hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dt).to(device).eval()
            pad = int(hf.config.pad_token_id if hf.config.pad_token_id is not None else 0)
            ours_model, _ = load_pretrained(str(folder), device=device, dtype=dt)
            blocks = max(clients) * (-(-longest // 16) + 1) + 16
            engine = Engine.for_model(ours_model.eval(), ours_model.config, num_blocks=blocks,
                                      max_batch=max(clients), device=device, dtype=dt)  # fmt: skip
            engine.start()
            try:
                for p_len, n_out in shapes:
                    for c in clients:
                        vocab = min(cfg.vocab_size, 1000)
                        # Warm-up at the cell's shape (C prompts, a few tokens): allocator, caches and
                        # batch-C buffers get sized before the first timed run, on every side.
                        warm = _prompts(c, p_len, vocab, next(seeds))
                        _dsv_wave(url, warm, 4, Path(tmp))
                        if engine_alone:
                            _engine_wave(engine, warm, 4)
                        _hf_wave(hf, warm, 4, pad, ttft=False)
                        ours, alone, theirs = [], [], []
                        for run in range(runs):
                            # Fresh prompts every run: a repeated prompt would be served from the
                            # prefix cache and skip its prefill.
                            prompts = _prompts(c, p_len, vocab, next(seeds))
                            ours.append(_dsv_wave(url, prompts, n_out, Path(tmp)))
                            progress.advance(task)
                            if engine_alone:
                                alone.append(_engine_wave(engine, prompts, n_out))
                            progress.advance(task)
                            # One static batch's prefill time varies little: measured in the first run.
                            theirs.append(_hf_wave(hf, prompts, n_out, pad, ttft=run == 0))
                            progress.advance(task)
                        o, t = _median(ours), _median(theirs)
                        rows.append({"preset": name, "layers": cfg.num_hidden_layers, "shape": f"{p_len}+{n_out}",
                                     "clients": c, "dsv": o, "engine": _median(alone), "hf": t,
                                     "ratio": o["tok_s"] / t["tok_s"], "dsv_runs": [r["tok_s"] for r in ours],
                                     # Each run's dsv wave against the transformers wave right after
                                     # it: drift of a shared machine between runs cancels out.
                                     "paired": statistics.median(a["tok_s"] / b["tok_s"] for a, b in zip(ours, theirs, strict=True)),
                                     "hf_runs": [r["tok_s"] for r in theirs]})  # fmt: skip
            finally:
                engine.stop()
                proc.terminate()
                proc.wait(timeout=60)
    load_after = os.getloadavg()[0]
    header = ["preset", "prompt+output", "clients", "dsv tok/s", "dsv engine alone tok/s", "HF tok/s", "dsv / HF",
              "dsv / HF paired", "dsv TTFT p50 / p99 (s)", "HF TTFT (s)"]  # fmt: skip
    md_rows = []
    for r in rows:
        cells = [f"{r['preset']} ({r['layers']} layers)", r["shape"], str(r["clients"]), f"{r['dsv']['tok_s']:.1f}",
                 f"{r['engine']['tok_s']:.1f}" if r["engine"] else "-", f"{r['hf']['tok_s']:.1f}", f"{r['ratio']:.2f}x",
                 f"{r['paired']:.2f}x",
                 f"{r['dsv']['ttft_p50']:.3f} / {r['dsv']['ttft_p99']:.3f}", f"{r['hf']['ttft_p50']:.3f}"]  # fmt: skip
        runs_cell = (
            ", ".join(f"{x:.0f}" for x in r["dsv_runs"]) + " / " + ", ".join(f"{x:.0f}" for x in r["hf_runs"])
        )
        md_rows.append("| " + " | ".join([*cells, runs_cell]) + " |")
    if as_json:
        print(json.dumps({"device": device, "dtype": dtype_name(dt), "threads": threads, "runs": runs, "rows": rows}))
    else:
        console.print(compact_table(rows))
    if write is not None:
        argv = " ".join(sys.argv[1:]) if sys.argv and Path(sys.argv[0]).name == "dsv" else "bench serve ..."
        md = "\n".join([
            "## dsv serve: output tokens/s and TTFT versus transformers generate",
            "",
            f"- command: `dsv {argv}`",
            f"- machine: {host(_gpu_note(torch, device), f', transformers {transformers.__version__}')}; "
            f"date: {datetime.date.today().isoformat()}; 1-minute load average {load_before:.1f} before, "
            f"{load_after:.1f} after",
            f"- random-weight checkpoints; `small` cut to {small_layers} layers to stay feasible on a CPU; "
            f"prompt+output tokens per client as listed, greedy; {dtype_name(dt)} on {device}; "
            f"{threads} torch thread(s) on each side; "
            f"glibc allocator thresholds {'raised on every side (dsv.core.allocator)' if tuned else 'left as they are'}; "
            f"median of {runs} runs after a warm-up wave of the same shape (4 output tokens), all sides "
            "measured in the same run; dsv / HF is the ratio of the medians, dsv / HF paired the median "
            "of each run's ratio (its dsv wave against the transformers wave right after it)",
            "- dsv: `dsv serve` process, C concurrent streaming clients on /v1/completions from a separate "
            "load-generator process (raw sockets), tokens/s = completion tokens / wave wall time, TTFT from "
            "request to first streamed event; dsv engine alone: the same requests into an in-process "
            "`Engine` (no HTTP); transformers: one `generate` batch of the C prompts, TTFT = the same "
            "batch with one new token (measured in the first run)",
            "",
            "| " + " | ".join([*header, "runs tok/s (dsv / HF)"]) + " |",
            "|" + "---|" * (len(header) + 1),
            *md_rows,
            "",
            f"![tokens/s and TTFT vs clients]({write.with_suffix('.png').name})",
            "",
        ])  # fmt: skip
        atomic_write_bytes(write, md.encode())
        out.print(f"wrote {write}")
        if plot_serve(rows, write.with_suffix(".png")):
            out.print(f"wrote {write.with_suffix('.png')}")


def compact_table(rows: list[dict[str, Any]]) -> Table:
    """The console form of the results: every cell short enough that the table fits 80 columns."""
    table = Table(title="dsv serve vs transformers generate (tokens/s; TTFT p50 in s; C clients)")
    for col in ("preset", "shape", "C", "dsv", "engine", "HF", "ratio", "paired", "TTFT"):
        table.add_column(col, justify="left" if col in ("preset", "shape") else "right", no_wrap=True)
    for r in rows:
        table.add_row(
            f"{r['preset']} {r['layers']}L", r["shape"], str(r["clients"]), f"{r['dsv']['tok_s']:.0f}",
            f"{r['engine']['tok_s']:.0f}" if r["engine"] else "-", f"{r['hf']['tok_s']:.0f}", f"{r['ratio']:.2f}x",
            f"{r['paired']:.2f}x", f"{r['dsv']['ttft_p50']:.2f}",
        )  # fmt: skip
    return table


def _gpu_note(torch: Any, device: str) -> str:
    """ ", GPU: NAME (every side runs on it)", ", GPU: NAME (unused: ...)" or ", no GPU"."""
    if device.startswith("cuda"):
        return f", GPU: {torch.cuda.get_device_name(torch.device(device))} (every side runs on it)"
    if torch.cuda.is_available():
        return f", GPU: {torch.cuda.get_device_name(0)} (unused: every side runs on the CPU)"
    return ", no GPU"


def plot_serve(rows: list[dict[str, Any]], path: Path) -> bool:
    """Tokens/s and TTFT p50 against clients, one column per (preset, shape), as a PNG at ``path``.

    Returns False (and writes nothing) when matplotlib is not installed.
    """
    from dsv.core.plot import pyplot, save_png

    plt = pyplot()
    if plt is None:
        console.print("[yellow]matplotlib not installed: no plot written[/]")
        return False
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((f"{r['preset']} ({r['layers']} layers)", r["shape"]), []).append(r)
    fig, axes = plt.subplots(2, len(groups), figsize=(4.2 * len(groups), 6.4), squeeze=False)
    for col, ((preset, shape), cell) in enumerate(groups.items()):
        cell = sorted(cell, key=lambda r: r["clients"])
        xs = [r["clients"] for r in cell]
        top, bottom = axes[0][col], axes[1][col]
        top.plot(xs, [r["dsv"]["tok_s"] for r in cell], "o-", color="C0", label="dsv serve (HTTP)")
        if all(r["engine"] for r in cell):
            top.plot(xs, [r["engine"]["tok_s"] for r in cell], "^--", color="C1", label="dsv engine alone")
        top.plot(xs, [r["hf"]["tok_s"] for r in cell], "s-", color="C2", label="transformers generate")
        top.set_title(f"{preset}, {shape} tokens")
        top.set_ylabel("output tokens/s")
        bottom.plot(xs, [r["dsv"]["ttft_p50"] for r in cell], "o-", color="C0", label="dsv serve p50")
        bottom.plot(xs, [r["dsv"]["ttft_p99"] for r in cell], "o:", color="C0", label="dsv serve p99")
        bottom.plot(xs, [r["hf"]["ttft_p50"] for r in cell], "s-", color="C2", label="transformers")
        bottom.set_ylabel("time to first token (s)")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_xlabel("concurrent clients")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    return True
