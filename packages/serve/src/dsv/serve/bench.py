"""``dsv bench serve``: serving throughput and time to first token, dsv-serve versus transformers.

For each preset a random checkpoint is written (``small`` cut to ``--small-layers`` layers so it
runs on a CPU), then in ONE run:

- **dsv**: a ``dsv serve`` process on 127.0.0.1 (native engine: continuous batching, paged cache)
  and C concurrent streaming clients on ``/v1/completions`` (httpx, asyncio). Each client sends
  its own ``--prompt-tokens`` random token ids (distinct, so the prefix cache does not help) and
  asks for ``--max-tokens`` greedy tokens. Output tokens/s = completion tokens (from the usage
  chunk) / wall time of the wave; TTFT = request sent to first streamed event.
- **transformers**: ``AutoModelForCausalLM`` (``DeepseekV32ForCausalLM``) on the same folder,
  ``generate`` on one batch of the same C prompts (equal lengths, so no padding is needed; the mask
  is passed), greedy, exactly ``--max-tokens`` new tokens. Its TTFT is the time of the same batch
  with one new token: with static batching every client waits for the whole prefill.

Both sides get ``--threads`` torch threads. Each cell is the median of ``--runs`` runs (after one
warm-up). ``--write FILE`` writes the Markdown section (atomically).

Run: ``dsv bench serve --runs 3 --write tools/bench/results/serve.md``.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import platform
import shutil
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

__all__ = ["bench_serve"]

console = Console()


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


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


def _prompts(n: int, length: int, vocab: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(n)
    # Above the special tokens; distinct rows so no two clients share a cached prefix.
    return torch.randint(16, vocab, (n, length), generator=g).tolist()


def _start_server(folder: Path, threads: int, max_batch: int) -> tuple[subprocess.Popen[bytes], str]:
    import httpx

    from dsv.serve.launch import free_port

    exe = shutil.which("dsv")
    cmd = [exe] if exe else [sys.executable, "-m", "dsv.cli.main"]
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(
        [*cmd, "serve", str(folder), "--port", str(port), "--model-name", "m", "--max-batch", str(max_batch),
         "--max-model-len", "2048"], env=env, stderr=subprocess.DEVNULL,
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


async def _one(http: Any, prompt: list[int], max_tokens: int) -> tuple[float, int]:
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with http.stream("POST", "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"server error: {chunk['error']}")
            if chunk.get("choices") and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    assert ttft is not None, "no token streamed"
    return ttft, tokens


async def _dsv_wave(url: str, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
    import httpx

    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        out = await asyncio.gather(*(_one(http, p, max_tokens) for p in prompts))
        wall = time.perf_counter() - t0
    ttfts = [t for t, _ in out]
    return {"tok_s": sum(n for _, n in out) / wall, "ttft_p50": _percentile(ttfts, 0.5),
            "ttft_p99": _percentile(ttfts, 0.99), "tokens": sum(n for _, n in out)}  # fmt: skip


def _hf_wave(model: Any, prompts: list[list[int]], max_tokens: int, pad_id: int) -> dict[str, float]:
    import torch

    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    kw = {"attention_mask": mask, "do_sample": False, "pad_token_id": pad_id}
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, **kw)
        wall = time.perf_counter() - t0
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"tok_s": tokens / wall, "ttft_p50": ttft, "ttft_p99": ttft, "tokens": tokens}


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def bench_serve(
    preset: list[str] = typer.Option(["tiny", "small"], help="Presets to measure."),
    small_layers: int = typer.Option(2, help="Layers kept for the small preset (CPU feasibility)."),
    clients: list[int] = typer.Option([1, 8, 32], help="Concurrent clients (transformers batch size)."),
    prompt_tokens: int = typer.Option(32, help="Prompt length per client."),
    max_tokens: int = typer.Option(32, help="Output tokens per client."),
    runs: int = typer.Option(3, help="Timed runs per cell (median reported)."),
    threads: int = typer.Option(1, help="Torch threads for both sides."),
    write: Path = typer.Option(None, help="Write the Markdown results section to this file."),
) -> None:
    """Serving output tokens/s and TTFT at 1/8/32 clients: dsv serve versus transformers generate."""
    import torch
    import transformers
    from rich.progress import Progress

    from dsv.core.checkpoint import atomic_write_bytes

    if runs < 1 or any(c < 1 for c in clients):
        print("error: --runs and --clients must be positive", file=sys.stderr)
        raise typer.Exit(2)
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, Progress(console=console) as progress:
        task = progress.add_task("bench serve", total=len(preset) * len(clients) * runs * 2)
        for name in preset:
            folder = Path(tmp) / name
            cfg = _make_checkpoint(name, small_layers if name == "small" else None, folder)
            proc, url = _start_server(folder, threads, max_batch=max(clients))
            hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            pad = int(hf.config.pad_token_id if hf.config.pad_token_id is not None else 0)
            try:
                for c in clients:
                    prompts = _prompts(c, prompt_tokens, min(cfg.vocab_size, 1000))
                    asyncio.run(_dsv_wave(url, prompts[:1], 4))  # warm-up
                    _hf_wave(hf, prompts[:1], 4, pad)
                    ours, theirs = [], []
                    for _ in range(runs):
                        ours.append(asyncio.run(_dsv_wave(url, prompts, max_tokens)))
                        progress.advance(task)
                        theirs.append(_hf_wave(hf, prompts, max_tokens, pad))
                        progress.advance(task)
                    o, t = _median(ours), _median(theirs)
                    rows.append({"preset": name, "layers": cfg.num_hidden_layers, "clients": c, "dsv": o, "hf": t,
                                 "ratio": o["tok_s"] / t["tok_s"],
                                 "dsv_runs": [r["tok_s"] for r in ours], "hf_runs": [r["tok_s"] for r in theirs]})  # fmt: skip
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    load_after = os.getloadavg()[0]
    table = Table(title="dsv serve vs transformers generate")
    header = [
        "preset",
        "clients",
        "dsv tok/s",
        "HF tok/s",
        "dsv / HF",
        "dsv TTFT p50 / p99 (s)",
        "HF TTFT (s)",
    ]
    for col in header:
        table.add_column(col)
    md_rows = []
    for r in rows:
        cells = [f"{r['preset']} ({r['layers']} layers)", str(r["clients"]), f"{r['dsv']['tok_s']:.1f}",
                 f"{r['hf']['tok_s']:.1f}", f"{r['ratio']:.2f}x",
                 f"{r['dsv']['ttft_p50']:.3f} / {r['dsv']['ttft_p99']:.3f}", f"{r['hf']['ttft_p50']:.3f}"]  # fmt: skip
        table.add_row(*cells)
        runs_cell = (
            ", ".join(f"{x:.0f}" for x in r["dsv_runs"]) + " / " + ", ".join(f"{x:.0f}" for x in r["hf_runs"])
        )
        md_rows.append("| " + " | ".join([*cells, runs_cell]) + " |")
    console.print(table)
    if write is not None:
        argv = " ".join(sys.argv[1:]) if sys.argv and Path(sys.argv[0]).name == "dsv" else "bench serve ..."
        md = "\n".join([
            "## dsv serve: output tokens/s and TTFT versus transformers generate",
            "",
            f"- command: `dsv {argv}`",
            f"- machine: 2-core CPU, no GPU, shared with other jobs ({platform.machine()}, Python "
            f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}); "
            f"date: {datetime.date.today().isoformat()}; 1-minute load average {load_before:.1f} before, "
            f"{load_after:.1f} after",
            f"- random-weight checkpoints; `small` cut to {small_layers} layers to stay feasible on a CPU; "
            f"{prompt_tokens} prompt tokens and {max_tokens} greedy output tokens per client; {threads} torch "
            f"thread(s) on each side; median of {runs} runs after a warm-up, both measured in the same run",
            "- dsv: `dsv serve` process, C concurrent streaming clients on /v1/completions, tokens/s = completion "
            "tokens / wave wall time, TTFT from request to first streamed event; transformers: one "
            "`generate` batch of the C prompts, TTFT = the same batch with one new token",
            "",
            "| " + " | ".join([*header, "runs tok/s (dsv / HF)"]) + " |",
            "|" + "---|" * (len(header) + 1),
            *md_rows,
            "",
        ])  # fmt: skip
        atomic_write_bytes(write, md.encode())
        console.print(f"wrote {write}")
