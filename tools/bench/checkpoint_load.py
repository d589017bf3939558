"""Loading a multi-shard checkpoint: dsv's ``load_pretrained`` against ``transformers``'
``AutoModelForCausalLM.from_pretrained`` on the same folders, in fresh processes.

Two folders of one random model (a widened tiny preset, ~80M parameters, 32 MiB shards): the fp32
checkpoint, and its FP8 copy written by ``dsv model convert --quantize fp8`` (loaded dequantised to
fp32 by both). Each measurement is a new Python process that imports everything first, then times
the load call alone and reads the growth of its peak RSS (``VmHWM``, reset just before the call).
Runs alternate the two loaders; medians and the median of per-run ratios. dsv's probe forward is off
(transformers runs none).

Prints a Markdown section; ``--write F`` also writes it to F::

    OMP_NUM_THREADS=1 python tools/bench/checkpoint_load.py --runs 3 --write tools/bench/results/checkpoint-load.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = """
import json, sys, time
from pathlib import Path
import torch

def hwm():
    d = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines() if ":" in l)
    return int(d["VmRSS"].split()[0]) * 1024, int(d["VmHWM"].split()[0]) * 1024

folder, which = sys.argv[1], sys.argv[2]
if which == "dsv":
    from dsv.core.checkpoint import load_config, load_pretrained
    from dsv.core.model import DSVForCausalLM
    import dsv.core.fp8, dsv.core.tokenizer
    with torch.device("meta"):
        DSVForCausalLM(load_config(Path(folder)))  # the imports the model's modules make
    load = lambda: load_pretrained(folder, dtype=torch.float32, with_tokenizer=False, probe=False)[0]
else:
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.logging.set_verbosity_error()
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(folder))
    load = lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
before, _ = hwm()
Path("/proc/self/clear_refs").write_text("5")
t0 = time.perf_counter()
model = load()
seconds = time.perf_counter() - t0
_, peak = hwm()
size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"seconds": seconds, "grew": peak - before, "model": size}))
"""


def _build(root: Path) -> tuple[Path, Path]:
    import torch

    from dsv.core.checkpoint import save_pretrained
    from dsv.core.convert import quantize
    from dsv.core.model import DSVForCausalLM
    from dsv.core.presets import tiny

    cfg = tiny(vocab_size=16384, hidden_size=512, intermediate_size=1536, moe_intermediate_size=384,
               n_routed_experts=16, num_hidden_layers=6, q_lora_rank=256, kv_lora_rank=128,
               num_nextn_predict_layers=0, index_topk=64)  # fmt: skip
    torch.manual_seed(0)
    src = save_pretrained(DSVForCausalLM(cfg), None, root / "fp32", max_shard_bytes=32 << 20)
    return src, quantize(src, root / "fp8").out


def _measure(folder: Path, which: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", PROBE, str(folder), which], capture_output=True, text=True,
                          check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--write", type=Path)
    args = ap.parse_args()
    mib = 2**20
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32, fp8 = _build(Path(tmp))
        for label, folder in (("fp32 checkpoint", fp32), ("FP8 checkpoint (dequantised to fp32)", fp8)):
            runs: dict[str, list[dict[str, float]]] = {"dsv": [], "transformers": []}
            for _ in range(args.runs):
                for which in runs:
                    runs[which].append(_measure(folder, which))
            shards = sorted(f.stat().st_size for f in folder.glob("*.safetensors"))
            d, t = runs["dsv"], runs["transformers"]
            rows.append(
                f"| {label} | {len(shards)} x <= {shards[-1] / mib:.0f} MiB | {d[0]['model'] / mib:.0f} MiB "
                f"| {statistics.median(r['seconds'] for r in d):.2f} s "
                f"| {statistics.median(r['seconds'] for r in t):.2f} s "
                f"| {statistics.median(b['seconds'] / a['seconds'] for a, b in zip(d, t, strict=True)):.2f}x "
                f"| {statistics.median(r['grew'] for r in d) / mib:.0f} MiB "
                f"| {statistics.median(r['grew'] for r in t) / mib:.0f} MiB "
                f"| {statistics.median(b['grew'] / a['grew'] for a, b in zip(d, t, strict=True)):.2f}x |"
            )
    import torch
    import transformers

    text = "\n".join([
        "## Checkpoint loading: dsv vs transformers",
        "",
        f"`OMP_NUM_THREADS=1 python tools/bench/checkpoint_load.py --runs {args.runs}` on "
        f"{platform.machine()} ({os.cpu_count()} cores), torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {datetime.date.today().isoformat()}. Each load in a fresh process; "
        "time of the load call and growth of peak RSS during it; medians, ratios = transformers / dsv "
        "per run (above 1: dsv faster or smaller).",
        "",
        "| folder | shards | model | dsv load | transformers load | time ratio | dsv peak RSS growth "
        "| transformers peak RSS growth | RSS ratio |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])  # fmt: skip
    print(text)
    if args.write:
        args.write.write_text(text)


if __name__ == "__main__":
    main()
