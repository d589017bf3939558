"""The serve engine's two decode paths in one process: the staging buffer (default) against decoding
from the paged pool (``Engine(staging=False)``, ``dsv serve --no-staging``: the cache memory bounded
by ``--num-blocks``).

The tiny preset with random weights, in-process (no HTTP), C sequences x P prompt + O output tokens,
greedy; the two paths alternate run by run on the same prompts; one torch thread. Prints the
tokens/s of each run, the medians and the ratio paged / staging::

    OMP_NUM_THREADS=1 python tools/bench/serve_staging.py --runs 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dsv.core import presets
from dsv.core.model import DSVForCausalLM
from dsv.serve.engine import Engine, GenParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--output", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = presets.tiny()
    model = DSVForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, cfg.vocab_size, (args.prompt,), generator=g).tolist() for _ in range(args.clients)]
    params = GenParams(temperature=0.0, max_tokens=args.output)  # no stop tokens: every row runs to the limit
    blocks = args.clients * (args.prompt + args.output) // 16 + 64  # room for every sequence: no preemption
    speed: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.runs):
        for staging in (True, False):
            engine = Engine.for_model(model, cfg, staging=staging, num_blocks=blocks, max_batch=args.clients)
            start = time.perf_counter()
            with torch.no_grad():
                done = engine.generate_many(prompts, params)
            speed[staging].append(sum(len(c.tokens) for c in done) / (time.perf_counter() - start))
    shape = f"{args.clients} x ({args.prompt}+{args.output}), tiny, {args.runs} runs"
    for staging, name in ((True, "staging"), (False, "paged")):
        runs = ", ".join(f"{v:.0f}" for v in speed[staging])
        print(f"{name:8s} tok/s: median {statistics.median(speed[staging]):.0f} ({runs})")
    ratio = statistics.median(speed[False]) / statistics.median(speed[True])
    print(f"paged / staging: {ratio:.2f}x  [{shape}]")


if __name__ == "__main__":
    main()
