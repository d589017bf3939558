"""Record a `dsv quickstart` run's report card in the benchmarks.

Copies ``RUN/report.md`` (headings one level down, image links moved) and its PNGs into
``tools/bench/results/quickstart.md`` and ``tools/bench/results/quickstart/``, with the command that
produced the run, and prints the headline row for ``tools/bench/results/headline.md``. Then run
``python tools/bench/assemble.py``.

    python tools/bench/quickstart_card.py /tmp/qs "OMP_NUM_THREADS=2 dsv quickstart --out /tmp/qs --no-progress"
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="the quickstart's --out folder (with report.md)")
    ap.add_argument("command", help="the command that produced the run, as it is to be recorded")
    args = ap.parse_args()
    report = args.run / "report.md"
    if not report.is_file():
        raise SystemExit(f"{report} is missing: finish the run first (dsv quickstart --out {args.run})")
    dest = RESULTS / "quickstart"
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("report-*.png"):
        old.unlink()
    for png in args.run.glob("report-*.png"):
        shutil.copy(png, dest / png.name)
    text = report.read_text()
    text = re.sub(r"\]\((report-[a-z-]+\.png)\)", r"](tools/bench/results/quickstart/\1)", text)
    text = re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + 1) + " ", text, flags=re.M)
    text = text.replace("## dsv quickstart report card", "## dsv quickstart: the recorded report card", 1)
    text = text.replace("\n\n", f"\n\nCommand: `{args.command}` (the report below is its `report.md`, image "
                        "paths moved).\n\n", 1)  # fmt: skip
    (RESULTS / "quickstart.md").write_text(text.rstrip() + "\n")

    rec = {p.stem: json.loads(p.read_text()) for p in (args.run / "stages").glob("*.json")}
    total = sum(r["seconds"] for r in rec.values())
    w, g, syn = rec["dsa-warmup"]["figures"], rec["grpo"]["figures"], rec["synth"]["figures"]
    acc = {k: v["no_thinking"]["accuracy"] for k, v in rec["eval"]["figures"]["models"].items()}
    print(f"| the whole recipe | tiny, 2-core CPU, {total / 60:.1f} min: indexer recall **{w['recall_before']:.3f} -> "
          f"{w['recall_after']:.3f}** after warm-up; held-out `{syn['family']}` accuracy pretrained "
          f"{acc['pretrained']:.2f}, SFT {acc['sft']:.2f}, GRPO **{acc['grpo']:.2f}** (best constant answer "
          f"{syn['constant_answer_accuracy']:.2f}); GRPO reward {g['reward_first']:.3f} -> {g['reward_last']:.3f} "
          f"| `{args.command}` (see \"dsv quickstart: the recorded report card\" below) | DATE |")  # fmt: skip


if __name__ == "__main__":
    main()
