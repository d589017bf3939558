"""Assemble BENCHMARKS.md from the per-area result files in tools/bench/results/.

Each benchmark writes its own Markdown section (command, machine, date, medians, ratios) into
``tools/bench/results/<area>.md``; this script joins them in a fixed order under one header so the
numbers have a single source. Run after any benchmark: ``python tools/bench/assemble.py``.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "tools" / "bench" / "results"
# The headline table first (the current figure of each area), then the recorded quickstart report card.
ORDER = ["headline", "quickstart", "core", "kernels", "train", "synth", "eval", "serve"]

HEADER = """# dsv benchmarks

Every number below was produced by a command in this repository; each section names the command, the
machine and the date. Timings are medians of several runs, and comparisons are ratios against a
baseline measured **in the same run**. This file is assembled from `tools/bench/results/*.md` by
`python tools/bench/assemble.py`; edit those files, not this one.

**Machines.** No GPU was available when these numbers were taken: every figure comes from the
2-core x86-64 CPU machine (24 GiB, torch 2.13.0 CPU build), usually while other jobs shared the two
cores, which makes absolute times noisy (ratios from the same run are the meaningful numbers). The
GPU targets of the kernels (sparse prefill >= 5x dense at 128K, decode >= 60% of memory bandwidth,
indexer >= 50% of peak) are **not measured yet**; `dsv bench kernels` runs unchanged on CUDA.

"""


def main() -> None:
    parts = [HEADER]
    names = [n for n in ORDER if (RESULTS / f"{n}.md").exists()]
    names += sorted(p.stem for p in RESULTS.glob("*.md") if p.stem not in ORDER)
    for name in names:
        text = (RESULTS / f"{name}.md").read_text().strip()
        # images sit beside the result files: make their links relative to the repository root
        text = re.sub(r"\]\((?!https?://|/|tools/)([^)]+\.png)\)", r"](tools/bench/results/\1)", text)
        parts.append(text + "\n\n")
    out = ROOT / "BENCHMARKS.md"
    fd, tmp = tempfile.mkstemp(dir=ROOT, prefix=".BENCHMARKS.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write("".join(parts).rstrip() + "\n")
    os.replace(tmp, out)
    print(f"wrote {out} from {len(names)} result files")


if __name__ == "__main__":
    main()
