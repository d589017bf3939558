"""Quality evidence for the two-stage DSA recipe on the tiny preset (CPU, about 20 minutes on 2 cores).

dense pretrain -> dsa-warmup (indexer only, KL to the dense attention) -> dsa-sparse (top-k on);
a dense control continues the dense model for as many steps as the sparse stage, so the DSA model
is compared with a dense model that saw the same data. Sequences are ``4 x index_topk`` long.

Reports:

- indexer recall (dense attention mass inside the indexer's top-k set) next to the *oracle* recall
  (mass inside the ideal top-k set, the top-k keys of the true head-summed attention: the ceiling
  of any indexer) and their ratio, for every model, for the main layers and for the MTP layer
  (whose indexer selects keys for the MTP block and is warmed up like the others);
- the warm-up curve: indexer/oracle recall at every ``--recall-every`` warm-up steps (from the
  run's checkpoints) and the KL loss, as a table and a PNG (``results/train_quality_recall.png``);
- validation loss of each model (the DSA ones evaluated with sparse attention);
- pass-key (needle at a random depth) retrieval accuracy at ``4 x index_topk`` tokens.

Writes ``OUT/quality.json`` and replaces the "DSA recipe quality" section of
``tools/bench/results/train.md``. One torch thread is the fastest setting on the 2-core machine
(4x faster than two for the tiny model, whose ops are too small to split), hence the command::

    OMP_NUM_THREADS=1 python tools/bench/train_quality.py --out /tmp/dsa-quality
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from dsv.core.checkpoint import atomic_write_bytes, load_pretrained
from dsv.train import TrainConfig, load_documents, pack, train, validation_loss
from dsv.train.data import default_documents
from dsv.train.metrics import passkey_scores, recall_stats

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS = RESULTS_DIR / "train.md"
PLOT = RESULTS_DIR / "train_quality_recall.png"
MARKER = "## DSA recipe quality"


def _warmup_curve(run: Path, dense_dir: Path, ids: torch.Tensor) -> list[dict[str, float]]:
    """Recall at step 0 (the dense model), at each kept checkpoint and at the end, plus the mean KL
    of the steps since the previous point (from ``metrics.jsonl``)."""
    kl = {
        m["step"]: m["indexer_loss"]
        for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    }
    points = [(0, dense_dir)] + [(int(p.name.split("-")[1]), p) for p in sorted(run.glob("checkpoint-*"))]
    points.append((max(kl), run / "final"))
    curve, prev = [], 0
    for step, path in points:
        model, _ = load_pretrained(path)
        st = recall_stats(model.eval(), ids)
        window = [kl[s] for s in range(prev + 1, step + 1) if s in kl]
        curve.append({"step": step, "indexer": st.indexer, "oracle": st.oracle,
                      "mtp": st.mtp[0][0] if st.mtp else float("nan"),
                      "mtp_oracle": st.mtp[0][1] if st.mtp else float("nan"),
                      "kl": sum(window) / len(window) if window else float("nan")})  # fmt: skip
        prev = step
    return curve


def _plot(curve: list[dict[str, float]], kl_steps: list[tuple[int, float]], path: Path, topk: int) -> None:
    from dsv.core.plot import pyplot, save_png

    plt = pyplot()
    if plt is None:
        raise SystemExit("train_quality.py writes a plot: pip install matplotlib")

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    steps = [c["step"] for c in curve]
    ax.plot(steps, [c["indexer"] for c in curve], "o-", markersize=3, label="indexer recall")
    ax.plot(steps, [c["oracle"] for c in curve], "--", color="grey", label="oracle (ideal top-k)")
    if all("mtp" in c for c in curve):
        ax.plot(steps, [c["mtp"] for c in curve], "s-", markersize=2, color="tab:green", label="MTP layer recall")
    ax.set_xlabel("dsa-warmup step")
    ax.set_ylabel(f"attention mass in top-{topk}")
    ax.set_ylim(0, 1)
    ax2 = ax.twinx()
    ax2.plot(*zip(*kl_steps, strict=True), color="tab:red", alpha=0.35, linewidth=0.8, label="KL (per step)")
    ax2.set_ylabel("indexer KL")
    ax2.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right", fontsize=8)
    ax.set_title("tiny preset: indexer warm-up (dense attention)", fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=80)


STAGE_DIRS = ("dense", "warmup", "sparse", "control")


def _train_all(args: argparse.Namespace, out: Path, common: dict[str, Any]) -> dict[str, float]:
    """The four stage runs (fresh folders); returns each run's training seconds.

    With ``--reuse-dense`` a finished dense run in OUT with the same settings is kept (its own
    training time is reported), so later stages can be re-run without the longest one.
    """
    dense_cfg = TrainConfig(stage="pretrain", model="tiny", out=out / "dense", steps=args.dense_steps,
                            attention="dense", lr=args.dense_lr, warmup_steps=50, **common)  # fmt: skip
    reuse = args.reuse_dense and _same_dense_run(out / "dense", dense_cfg)
    for stage in STAGE_DIRS:
        if not (reuse and stage == "dense"):
            shutil.rmtree(out / stage, ignore_errors=True)
    runs: dict[str, float] = {}
    if reuse:
        runs["dense"] = json.loads((out / "dense" / "summary.json").read_text())["seconds"]
    else:
        runs["dense"] = train(dense_cfg).seconds
    runs["warmup"] = train(TrainConfig(stage="dsa-warmup", model=str(out / "dense" / "final"), out=out / "warmup",
                                       steps=args.warmup_steps, lr=args.warmup_lr,
                                       **{**common, "save_every": args.recall_every}, keep_last=0)).seconds  # fmt: skip
    runs["sparse"] = train(TrainConfig(stage="dsa-sparse", model=str(out / "warmup" / "final"), out=out / "sparse",
                                       steps=args.sparse_steps, lr=3e-4, **common)).seconds  # fmt: skip
    runs["control"] = train(TrainConfig(stage="pretrain", model=str(out / "dense" / "final"), out=out / "control",
                                        steps=args.sparse_steps, attention="dense", lr=3e-4, schedule="constant",
                                        **common)).seconds  # fmt: skip
    return runs


def _same_dense_run(folder: Path, cfg: TrainConfig) -> bool:
    """Whether ``folder`` holds a finished dense run trained with ``cfg``'s settings."""
    try:
        done = json.loads((folder / "train_config.json").read_text())
        json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    keys = ("model", "data", "steps", "micro_batch_size", "seq_len", "lr", "warmup_steps", "weight_decay",
            "attention", "seed")  # fmt: skip
    want = {k: str(getattr(cfg, k)) for k in keys}
    return (folder / "final").is_dir() and all(str(done.get(k)) == v for k, v in want.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--dense-steps", type=int, default=3000)
    ap.add_argument("--dense-lr", type=float, default=3e-3)
    ap.add_argument("--warmup-steps", type=int, default=1000, help="1000 as in the V3.2 report's warm-up.")
    ap.add_argument("--warmup-lr", type=float, default=3e-3)
    ap.add_argument("--recall-every", type=int, default=50, help="Warm-up steps between recall points.")
    ap.add_argument(
        "--reuse-dense",
        action="store_true",
        help="Keep OUT/dense when it was trained with the same settings.",
    )
    ap.add_argument("--sparse-steps", type=int, default=250)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--docs", type=int, default=24000, help="Documents of the default corpus.")
    ap.add_argument("--passkey-share", type=float, default=0.9, help="Share of pass-key documents.")
    ap.add_argument("--passkey-n", type=int, default=100)
    ap.add_argument(
        "--passkey-distinct", type=int, default=3,
        help="Haystacks cycle this many random sentences (0: every filler sentence is fresh).",
    )  # fmt: skip
    ap.add_argument(
        "--weight-decay", type=float, default=0.0,
        help="AdamW weight decay of every stage (decay keeps a small model's attention diffuse).",
    )  # fmt: skip
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest for the tiny preset)."
    )
    ap.add_argument("--no-write", action="store_true", help="Do not write the results file and plot.")
    ap.add_argument("--report-only", action="store_true", help="Rewrite results from OUT/quality.json.")
    ap.add_argument(
        "--eval-only", action="store_true", help="Evaluate the runs already in OUT (give the same settings)."
    )
    args = ap.parse_args()
    if args.report_only:
        write_report(args.out)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    topk = 32  # tiny preset
    seq = 4 * topk
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    # The default corpus with a larger pass-key share: retrieval across the row is what sparse
    # attention must keep, and the dense model only learns it when most documents ask for it.
    distinct = args.passkey_distinct or None
    data = out / "data.jsonl"
    if not args.eval_only:
        mix = default_documents(args.docs, 0, passkey_share=args.passkey_share, passkey_distinct=distinct)
        atomic_write_bytes(data, "".join(json.dumps({"text": d.text}) + "\n" for d in mix).encode())
    common = {"seq_len": seq, "micro_batch_size": args.batch, "data": [str(data)], "progress": False,
              "tensorboard": False, "save_every": 0, "eval_rows": 32, "val_fraction": 0.05,
              "weight_decay": args.weight_decay}  # fmt: skip
    if args.eval_only:  # the runs' own wall time: from the previous report, else the stage loops
        stage_seconds = {k: json.loads((out / k / "summary.json").read_text())["seconds"] for k in STAGE_DIRS}
        prev = out / "quality.json"
        train_seconds = (
            json.loads(prev.read_text())["train_seconds"] if prev.exists() else sum(stage_seconds.values())
        )
    else:
        stage_seconds = _train_all(args, out, common)
        train_seconds = sum(stage_seconds.values())
    dense_dir = out / "dense" / "final"
    t_eval = time.perf_counter()
    # Same validation rows as the trainer holds out.
    _, tok = load_pretrained(dense_dir)
    docs, _ = load_documents([str(data)])
    _, val = pack(tok, docs, seq, seed=0).split(0.05, 0)
    ids, labels = val.input_ids[:64], val.labels[:64]
    rec_ids = ids[:16]

    curve = _warmup_curve(out / "warmup", dense_dir, rec_ids)

    def evaluate(path: Path, sparse: bool) -> dict[str, Any]:
        model, _ = load_pretrained(path)
        model.eval()
        st = recall_stats(model, rec_ids)
        return {
            "val_loss": validation_loss(model, ids, labels, use_sparse=sparse),
            "recall": st.indexer, "oracle": st.oracle, "ratio": st.ratio, "per_layer": st.per_layer,
            "mtp": st.mtp,
            **{f"passkey_{k}" if k != "exact" else "passkey": v for k, v in dataclasses.asdict(
                passkey_scores(model, tok, context_tokens=seq, n=args.passkey_n, use_sparse=sparse,
                           distinct=distinct)).items()},
        }  # fmt: skip

    table = {
        "dense (pretrain, dense attention)": evaluate(dense_dir, False),
        "dense + random indexer, sparse attention (before warm-up)": evaluate(dense_dir, True),
        "after dsa-warmup, sparse attention": evaluate(out / "warmup" / "final", True),
        "after dsa-sparse (DSA model), sparse attention": evaluate(out / "sparse" / "final", True),
        "dense control (+ same steps, dense attention)": evaluate(out / "control" / "final", False),
    }
    total = train_seconds + time.perf_counter() - t_eval
    dsa_row = table["after dsa-sparse (DSA model), sparse attention"]
    ctl_row = table["dense control (+ same steps, dense attention)"]
    dsa, ctl = dsa_row["val_loss"], ctl_row["val_loss"]
    quarter = [c for c in curve if c["step"] >= 0.75 * args.warmup_steps]
    late_gain = curve[-1]["indexer"] - quarter[0]["indexer"]
    report = {
        "table": table, "warmup_curve": curve, "recall_last_quarter_gain": late_gain,
        "dsa_vs_dense_val_loss_rel": (dsa - ctl) / ctl, "train_seconds": train_seconds, "total_seconds": total,
        "stage_seconds": stage_seconds, "date": datetime.date.today().isoformat(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }  # fmt: skip
    atomic_write_bytes(out / "quality.json", json.dumps(report, indent=2).encode())
    print(json.dumps(report, indent=2))
    if not args.no_write:
        write_report(out)


def write_report(out: Path) -> None:
    """Plot the warm-up curve and replace the results section from ``OUT/quality.json``."""
    report = json.loads((out / "quality.json").read_text())
    a = report["args"]
    topk = 32
    seq = 4 * topk
    table, curve = report["table"], report["warmup_curve"]
    kl_steps = [(m["step"], m["indexer_loss"]) for m in map(json.loads, (out / "warmup" / "metrics.jsonl").read_text().splitlines())]  # fmt: skip
    _plot(curve, kl_steps, PLOT, topk)
    dense_row = table["dense (pretrain, dense attention)"]
    after = table["after dsa-warmup, sparse attention"]
    dsa_row = table["after dsa-sparse (DSA model), sparse attention"]
    ctl_row = table["dense control (+ same steps, dense attention)"]
    rel = report["dsa_vs_dense_val_loss_rel"]
    total, train_s = report["total_seconds"], report["train_seconds"]
    date = report.get("date", datetime.date.today().isoformat())
    lines = [
        f"{MARKER} (tiny preset, dense -> dsa-warmup -> dsa-sparse)",
        "",
        f"Command: `OMP_NUM_THREADS=1 python tools/bench/train_quality.py --out /tmp/dsa-quality` (dense "
        f"{a['dense_steps']} steps at lr {float(a['dense_lr']):g}, dsa-warmup {a['warmup_steps']} steps at lr "
        f"{float(a['warmup_lr']):g}, dsa-sparse {a['sparse_steps']} steps and a dense control of as many steps "
        f"at lr 3e-4; batch {a['batch']} x {seq} tokens, index_topk {topk}; the default corpus generator, "
        f"{a['docs']} documents, {float(a['passkey_share']):.0%} of them pass-key documents"
        + (f" whose haystacks cycle {a['passkey_distinct']} random sentences" if int(a.get("passkey_distinct", 0)) else "")
        + f"; AdamW weight decay {float(a.get('weight_decay', 0.1)):g} in every stage).",
        f"Machine: 2-core CPU, no GPU (shared with other jobs), torch threads {a['threads']}; {date}; "
        f"one seeded run, {total / 60:.1f} min in total (training {train_s / 60:.1f} min"
        + ("; the dense stage came from an earlier invocation with the same settings, `--reuse-dense`"
           if a.get("reuse_dense") == "True" else "")
        + ").",
        "",
        "Recall = share of the dense (head-summed, L1-normalised) attention mass inside a top-"
        f"{topk} set, averaged over both layers and the queries past position {topk}. *Oracle* = the "
        "same for the ideal set (the top-k keys of the true attention): the ceiling of any indexer. "
        "The indexer / oracle column says how close the indexer gets to what any top-k selection can do.",
        "",
        "Settings that decide whether 0.9 is reachable at this scale (probes on the tiny preset, same "
        "corpus generator): with AdamW weight decay 0.1 the dense model's attention stays diffuse and "
        "even the oracle top-32 set holds only 0.83 of the mass (the indexer reached 0.81, 0.97 of it); "
        "without decay, and with haystacks that repeat a few sentences (copying pressure, as in the "
        "classic pass-key haystack), the oracle rises above 0.9; with 4 index heads the warm-up then "
        "plateaued at 0.884 (0.96 of its oracle), with the preset's 8 heads at 0.899 (lr 1e-3) and 0.902 "
        "(lr 3e-3) on the same dense model.",
        "",
        f"Warm-up: indexer recall **{curve[0]['indexer']:.3f} -> {after['recall']:.3f}** of an oracle "
        f"**{after['oracle']:.3f}** = **{after['ratio']:.2f} of the ceiling**; gain over the last quarter "
        f"of the warm-up: {report['recall_last_quarter_gain']:+.3f}. Absolute recall target >= 0.9: "
        + ("met." if after["recall"] >= 0.9 else "not met (above the ceiling)." if after["oracle"] < 0.9 else "not met."),
        "",
        "| model | val loss | indexer recall | oracle recall | indexer / oracle "
        "| pass-key exact / first token / per token @ 4x top-k |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, r in table.items():
        lines.append(
            f"| {name} | {r['val_loss']:.4f} | {r['recall']:.3f} | {r['oracle']:.3f} | {r['ratio']:.2f} | "
            f"{r['passkey']:.2f} / {r.get('passkey_first_token', float('nan')):.2f} / "
            f"{r.get('passkey_token', float('nan')):.2f} |"
        )
    rnd_row = table["dense + random indexer, sparse attention (before warm-up)"]

    def pk(r: dict[str, Any]) -> str:
        return f"{r['passkey']:.2f} / {r.get('passkey_first_token', float('nan')):.2f}"

    if dense_row["passkey"] > 0 or ctl_row["passkey"] > 0:
        passkey = (
            f"exact / first token: dense control {pk(ctl_row)} vs DSA {pk(dsa_row)} "
            f"({100 * (dsa_row['passkey'] - ctl_row['passkey']):+.0f} points exact)."
        )
    elif dense_row.get("passkey_first_token", 0.0) > 0.2:
        passkey = (
            "exact match is 0 for every model: the dense model puts the needle's first key token on top in "
            f"{dense_row['passkey_first_token']:.2f} of the prompts but has not learned to copy the rest of the "
            f"key within this budget (per key token {dense_row['passkey_token']:.2f}, teacher-forced). On the first key "
            f"token, dense control {ctl_row['passkey_first_token']:.2f} vs DSA "
            f"{dsa_row['passkey_first_token']:.2f}; the dense weights with an untrained indexer under sparse "
            f"attention reach {rnd_row['passkey_first_token']:.2f}."
        )
    else:
        passkey = (
            "the dense models did not learn the task within this budget, so the comparison says nothing "
            "about sparse attention."
        )
    if all(r.get("mtp") for r in table.values()):
        lines += [
            "",
            "MTP layer (its indexer selects the keys of the MTP block's attention: trained on the same KL "
            "in both stages; rows of the same 16 validation sequences, its queries past position "
            f"{topk} of the {seq - 1} it sees):",
            "",
            "| model | MTP indexer recall | MTP oracle recall | indexer / oracle |",
            "|---|---|---|---|",
        ]
        for name, r in table.items():
            a_, b_ = r["mtp"][0]
            lines.append(f"| {name} | {a_:.3f} | {b_:.3f} | {a_ / b_:.2f} |")
    lines += [
        "",
        f"DSA vs dense control validation loss: {100 * rel:+.3f}% (target: within 2%). The validation rows "
        "come from the same mix, so they are mostly pass-key documents.",
        "",
        f"Pass-key: {a['passkey_n']} prompts (BOS, filler with the needle at a random depth, question) "
        f"that with the answer fit in {seq} tokens, greedy decoding; {passkey}",
        "",
        "Per layer (indexer / oracle) after dsa-sparse: "
        + ", ".join(f"layer {i}: {x:.3f} / {y:.3f}" for i, (x, y) in enumerate(dsa_row["per_layer"]))
        + ".",
        "",
        "Warm-up curve (recall on 16 validation rows from the run's checkpoints; KL = mean of the steps "
        f"since the previous point), plotted in `results/{PLOT.name}`:",
        "",
        "| warm-up step | indexer recall | oracle | indexer / oracle | MTP indexer / oracle | mean KL |",
        "|---|---|---|---|---|---|",
    ]
    for c in curve:
        kl = "-" if c["kl"] != c["kl"] else f"{c['kl']:.4f}"
        mtp = "-" if c.get("mtp", float("nan")) != c.get("mtp") else f"{c['mtp']:.3f} / {c['mtp_oracle']:.3f}"
        lines.append(
            f"| {c['step']} | {c['indexer']:.3f} | {c['oracle']:.3f} | {c['indexer'] / c['oracle']:.2f} | {mtp} "
            f"| {kl} |"
        )
    lines.append("")
    old = RESULTS.read_text() if RESULTS.exists() else "# dsv train benchmarks\n\n"
    if MARKER in old:  # replace the previous section
        head, _, rest = old.partition(MARKER)
        nxt = rest.find("\n## ")
        old = head + (rest[nxt + 1 :] if nxt >= 0 else "")
    atomic_write_bytes(RESULTS, (old.rstrip() + "\n\n" + "\n".join(lines)).encode())


if __name__ == "__main__":
    main()
