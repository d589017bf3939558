"""Quality evidence for the two-stage DSA recipe on the tiny preset (CPU, about 10 minutes on 2 cores).

dense pretrain -> dsa-warmup (indexer only, KL to the dense attention) -> dsa-sparse (top-k on);
a dense control continues the dense model for as many steps as the sparse stage, so the DSA model
is compared with a dense model that saw the same data. Sequences are ``4 x index_topk`` long.

Reports: indexer recall (dense attention mass inside the top-k set) before/after the warm-up and
after sparse training; validation loss of each model (the DSA one evaluated with sparse attention);
pass-key (needle) retrieval accuracy at ``4 x index_topk`` tokens. Appends a Markdown section to
``tools/bench/results/train.md``.

Run::

    python tools/bench/train_quality.py --out /tmp/dsa-quality
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from dsv.core.checkpoint import load_pretrained
from dsv.train import (
    TrainConfig,
    indexer_recall,
    load_documents,
    pack,
    passkey_accuracy,
    train,
    validation_loss,
)

RESULTS = Path(__file__).resolve().parent / "results" / "train.md"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dense-steps", type=int, default=200)
    ap.add_argument("--warmup-steps", type=int, default=60)
    ap.add_argument("--sparse-steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--passkey-n", type=int, default=20)
    ap.add_argument("--no-write", action="store_true", help="Do not append to the results file.")
    args = ap.parse_args()
    torch.manual_seed(0)
    topk = 32  # tiny preset
    seq = 4 * topk
    common = {"seq_len": seq, "micro_batch_size": args.batch, "default_data_size": args.docs, "progress": False,
              "tensorboard": False, "save_every": 0, "eval_rows": 32, "val_fraction": 0.05}  # fmt: skip
    t0 = time.perf_counter()
    out = args.out
    runs = {}
    runs["dense"] = train(TrainConfig(stage="pretrain", model="tiny", out=out / "dense", steps=args.dense_steps,
                                      attention="dense", lr=2e-3, warmup_steps=20, **common))  # fmt: skip
    dense_dir = out / "dense" / "final"
    runs["warmup"] = train(TrainConfig(stage="dsa-warmup", model=str(dense_dir), out=out / "warmup",
                                       steps=args.warmup_steps, lr=1e-3, **common))  # fmt: skip
    runs["sparse"] = train(TrainConfig(stage="dsa-sparse", model=str(out / "warmup" / "final"), out=out / "sparse",
                                       steps=args.sparse_steps, lr=3e-4, **common))  # fmt: skip
    runs["control"] = train(TrainConfig(stage="pretrain", model=str(dense_dir), out=out / "control",
                                        steps=args.sparse_steps, attention="dense", lr=3e-4, schedule="constant",
                                        **common))  # fmt: skip
    train_seconds = time.perf_counter() - t0

    # Same validation rows as the trainer holds out.
    dense, tok = load_pretrained(dense_dir)
    docs, _ = load_documents(["default"], default_size=args.docs, seed=0)
    _, val = pack(tok, docs, seq, seed=0).split(0.05, 0)
    ids, labels = val.input_ids[:64], val.labels[:64]

    def evaluate(path: Path, sparse: bool) -> dict[str, float]:
        model, _ = load_pretrained(path)
        res = {"val_loss": validation_loss(model, ids, labels, use_sparse=sparse)}
        if model.config.has_indexer:
            res["recall"] = indexer_recall(model, ids[:16])
        res["passkey"] = passkey_accuracy(model, tok, context_tokens=seq, n=args.passkey_n, use_sparse=sparse)
        return res

    table = {
        "dense (pretrain, dense attention)": evaluate(dense_dir, False),
        "dense + random indexer, sparse attention (before warm-up)": evaluate(dense_dir, True),
        "after dsa-warmup, sparse attention": evaluate(out / "warmup" / "final", True),
        "after dsa-sparse (DSA model), sparse attention": evaluate(out / "sparse" / "final", True),
        "dense control (+ same steps, dense attention)": evaluate(out / "control" / "final", False),
    }
    total = time.perf_counter() - t0
    dsa = table["after dsa-sparse (DSA model), sparse attention"]["val_loss"]
    ctl = table["dense control (+ same steps, dense attention)"]["val_loss"]
    report = {
        "table": table, "recall_before_warmup": runs["warmup"].recall_before, "recall_after_warmup": runs["warmup"].recall_after,
        "dsa_vs_dense_val_loss_rel": (dsa - ctl) / ctl, "train_seconds": train_seconds, "total_seconds": total,
        "args": {k: str(v) for k, v in vars(args).items()},
    }  # fmt: skip
    (out / "quality.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    if args.no_write:
        return
    lines = [
        "## DSA recipe quality (tiny preset, dense -> dsa-warmup -> dsa-sparse)",
        "",
        f"Command: `python tools/bench/train_quality.py --out /tmp/dsa-quality` (dense {args.dense_steps} steps, "
        f"warm-up {args.warmup_steps}, sparse {args.sparse_steps}, batch {args.batch} x {seq} tokens, index_topk {topk}).",
        f"Machine: 2-core CPU, no GPU (shared with other jobs); {datetime.date.today().isoformat()}; "
        f"one run (seeded), {total / 60:.1f} min in total.",
        "",
        f"Indexer recall (share of dense attention mass in the top-{topk} set, queries past position {topk}): "
        f"**{runs['warmup'].recall_before:.3f} before warm-up -> {runs['warmup'].recall_after:.3f} after** (target >= 0.9).",
        "",
        "| model | val loss | indexer recall | pass-key acc @ 4x top-k |",
        "|---|---|---|---|",
    ]
    for name, r in table.items():
        rec = f"{r['recall']:.3f}" if "recall" in r else "-"
        lines.append(f"| {name} | {r['val_loss']:.4f} | {rec} | {r['passkey']:.2f} |")
    lines += [
        "",
        f"DSA vs dense control validation loss: {100 * (dsa - ctl) / ctl:+.2f}% (target: within 2%).",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    old = RESULTS.read_text() if RESULTS.exists() else "# dsv train benchmarks\n\n"
    marker = "## DSA recipe quality"
    if marker in old:  # replace the previous section
        head, _, rest = old.partition(marker)
        nxt = rest.find("\n## ")
        old = head + (rest[nxt + 1 :] if nxt >= 0 else "")
    from dsv.core.checkpoint import atomic_write_bytes

    atomic_write_bytes(RESULTS, (old.rstrip() + "\n\n" + "\n".join(lines)).encode())


if __name__ == "__main__":
    main()
