"""Training throughput: ``dsv train pretrain`` versus a minimal plain-torch loop on the same tiny model,
data, batch and optimizer, run alternately in one session (CPU).

Both use dense attention, AdamW, gradient clipping and the same packed rows; dsv's loop also does
the MoE bias update, the balance loss, metrics and the accelerate wrapping (MTP loss off in both,
no checkpoints but the final one, which is outside the timed loop). Tokens/s is counted over the
timed steps of each run; the median of ``--repeats`` runs is reported with the ratio.

Run::

    python tools/bench/train_throughput.py --out /tmp/dsv-throughput
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dsv.core.model import DSVForCausalLM
from dsv.core.presets import tiny
from dsv.core.tokenizer import default_corpus, train_bpe
from dsv.train import TrainConfig, load_documents, pack, train
from dsv.train.data import IGNORE_INDEX

RESULTS = Path(__file__).resolve().parent / "results" / "train.md"


def plain_loop(rows: torch.Tensor, labels: torch.Tensor, steps: int, batch: int) -> float:
    torch.manual_seed(0)
    model = DSVForCausalLM(tiny())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    t0 = time.perf_counter()
    for step in range(steps):
        i = torch.arange(step * batch, (step + 1) * batch) % rows.shape[0]
        logits = model(rows[i], use_sparse=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1), labels[i].flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch * rows.shape[1] / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    tok = train_bpe(default_corpus(2000), 1024)
    docs, _ = load_documents(["default"], default_size=1000)
    packed = pack(tok, docs, args.seq_len)
    dsv_tps, plain_tps = [], []
    for r in range(args.repeats):
        s = train(TrainConfig(stage="pretrain", model="tiny", out=args.out / f"run{r}", steps=args.steps,
                              micro_batch_size=args.batch, seq_len=args.seq_len, attention="dense", mtp_loss_weight=0.0,
                              default_data_size=1000, progress=False, tensorboard=False, plot=False, save_every=0,
                              val_fraction=0.0))  # fmt: skip
        dsv_tps.append(s.tokens_per_second)
        plain_tps.append(plain_loop(packed.input_ids, packed.labels, args.steps, args.batch))
        print(f"repeat {r}: dsv {dsv_tps[-1]:.0f} tok/s, plain torch {plain_tps[-1]:.0f} tok/s", flush=True)
    d, p = statistics.median(dsv_tps), statistics.median(plain_tps)
    print(f"median: dsv {d:.0f} tok/s, plain {p:.0f} tok/s, ratio {d / p:.3f}")
    if args.no_write:
        return
    lines = [
        "## Training throughput (tiny preset, dense attention)",
        "",
        f"Command: `python tools/bench/train_throughput.py --out /tmp/dsv-throughput` ({args.steps} steps, batch "
        f"{args.batch} x {args.seq_len} tokens, {args.repeats} alternating repeats).",
        f"Machine: 2-core CPU, no GPU (shared with other jobs, so absolute numbers are noisy); "
        f"{datetime.date.today().isoformat()}; torch threads {torch.get_num_threads()}.",
        "",
        "| loop | median tokens/s | runs |",
        "|---|---|---|",
        f"| dsv train pretrain (accelerate, bias update, balance loss, metrics) | {d:.0f} | {', '.join(f'{x:.0f}' for x in dsv_tps)} |",
        f"| plain torch loop (forward, CE, AdamW, clip) | {p:.0f} | {', '.join(f'{x:.0f}' for x in plain_tps)} |",
        "",
        f"Ratio dsv / plain: **{d / p:.3f}**.",
        "",
    ]
    old = RESULTS.read_text() if RESULTS.exists() else "# dsv train benchmarks\n\n"
    marker = "## Training throughput"
    if marker in old:
        head, _, rest = old.partition(marker)
        nxt = rest.find("\n## ")
        old = head + (rest[nxt + 1 :] if nxt >= 0 else "")
    from dsv.core.checkpoint import atomic_write_bytes

    atomic_write_bytes(RESULTS, (old.rstrip() + "\n\n" + "\n".join(lines)).encode())


if __name__ == "__main__":
    main()
