"""The eval report: ``report.json``, ``report.md`` and PNG plots written to the output dir.

Plots use matplotlib's Agg backend (no display needed) and are written atomically like
everything else: one ``accuracy_vs_tokens.png`` with a point per (family, thinking
mode) at (mean output tokens, accuracy), lines joining a family's thinking-off and
thinking-on points, so the cost of thinking is visible at a glance.
"""

from __future__ import annotations

import io
import math
import re
from pathlib import Path
from typing import Any

from dsv.synth.eval._io import atomic_write_bytes, atomic_write_json, atomic_write_text
from dsv.synth.eval.metrics import summarize_groups

__all__ = ["build_report", "group_reasons", "write_report"]

PLOT_NAME = "accuracy_vs_tokens.png"


def build_report(records: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """The report dict: run metadata plus metrics per thinking mode, overall and per family.

    One folder can hold both thinking modes (a run with and one without ``--thinking``), so the
    report says which modes it covers and the episodes of each; what the last run asked for
    (``thinking``, ``episodes_wanted``) moves under ``last_run`` instead of reading as the whole.
    """
    results = summarize_groups(records)
    meta = dict(meta)
    last_run = {k: meta.pop(k) for k in ("thinking", "episodes_wanted") if k in meta}
    meta["modes"] = list(results)
    meta["episodes_per_mode"] = {mode: block["overall"]["episodes"] for mode, block in results.items()}
    if last_run:
        meta["last_run"] = last_run
    return {"meta": meta, "results": results}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def render_markdown(report: dict[str, Any]) -> str:
    """A Markdown rendering of ``report`` (tables per thinking mode, failure reasons)."""
    meta = report["meta"]
    lines = ["# dsv eval report", ""]
    for key in ("target", "tasks_source", "modes", "samples", "concurrency", "started", "finished"):
        if key in meta:
            lines.append(f"- {key}: `{meta[key]}`")
    lines.append("")
    for mode, block in report["results"].items():
        overall = block["overall"]
        pass_keys = [k for k in overall if k.startswith("pass@")]
        lines += [f"## {mode}", ""]
        header = [
            "family",
            "tasks",
            "episodes",
            "accuracy",
            *pass_keys,
            "out tok mean",
            "out tok p90",
            "reasoning tok mean",
            "reasoning tok p90",
            "tool calls/ep",
            "errors",
        ]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        rows = [*block["families"].items(), ("**all**", overall)]
        for name, m in rows:
            cells = [
                name,
                m["tasks"],
                m["episodes"],
                m["accuracy"],
                *[m.get(k, math.nan) for k in pass_keys],
                m["output_tokens_mean"],
                m["output_tokens_p90"],
                m["reasoning_tokens_mean"],
                m["reasoning_tokens_p90"],
                m["tool_calls_per_episode"],
                m["errors"],
            ]
            lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
        lines.append("")
        lines.append(
            "Reasoning tokens counted from: "
            + ", ".join(f"`{s}`" for s in overall["reasoning_tokens_source"])
            + " (`usage` = server's completion_tokens_details.reasoning_tokens, `tokenizer` = the "
            "checkpoint's tokenizer on reasoning_content, `approx` = len(reasoning_content)/4, "
            "`none` = no reasoning produced)."
        )
        lines.append("")
        if overall["failure_reasons"]:
            lines += ["Failure reasons:", ""]
            lines += [f"- {count} × {reason}" for reason, count in group_reasons(overall["failure_reasons"])]
            lines.append("")
    if report.get("plots"):
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]] + [""]
    return "\n".join(lines)


# Each wrong answer makes its own reason ("'Alice' is not the answer", "expected 12, got 13"); what
# a reader wants is the kind of failure. Quoted text and numbers are the parts that vary.
_VARYING = re.compile(r"'[^']*'|\"[^\"]*\"|-?\d+(?:[./]\d+)*")


def group_reasons(reasons: dict[str, int], limit: int = 12) -> list[tuple[str, int]]:
    """Failure reasons grouped by their shape (quoted values and numbers as ``…``), most common
    first; a shape seen once keeps its full text, and the tail past ``limit`` is one line."""
    groups: dict[str, list[tuple[str, int]]] = {}
    for reason, count in reasons.items():
        groups.setdefault(_VARYING.sub("…", reason), []).append((reason, count))
    rows = sorted(
        ((members[0][0] if len(members) == 1 else shape, sum(c for _, c in members))
         for shape, members in groups.items()),
        key=lambda row: -row[1],
    )  # fmt: skip
    if len(rows) > limit:
        rest = rows[limit - 1 :]
        rows = [*rows[: limit - 1], (f"{len(rest)} other kinds of failure", sum(c for _, c in rest))]
    return rows


def _plot(report: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    markers = {"no-thinking": "o", "thinking": "^"}
    points: dict[str, list[tuple[float, float]]] = {}
    for mode, block in report["results"].items():
        for family, m in block["families"].items():
            x, y = m["output_tokens_mean"], m["accuracy"]
            if math.isnan(x) or math.isnan(y):
                continue
            points.setdefault(family, []).append((x, y))
            ax.scatter([x], [y], marker=markers.get(mode, "s"), label=f"{family} ({mode})")
    for pts in points.values():
        if len(pts) > 1:
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], linewidth=0.8, alpha=0.6)
    ax.set_xlabel("mean output tokens per episode")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("accuracy vs output tokens, per family")
    ax.grid(True, alpha=0.3)
    if points:
        ax.legend(fontsize=7, loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_report(out_dir: str | Path, records: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """Write report.json, report.md and the plot into ``out_dir``; return the report dict."""
    out_dir = Path(out_dir)
    report = build_report(records, meta)
    try:
        png = _plot(report)
    except ImportError:  # the numbers matter more than the picture: report without it
        report["plots"] = []
        from dsv.cli.errors import install_hint

        report["plots_skipped"] = f"matplotlib is not installed ({install_hint('dsv-synth', 'eval')})"
    else:
        atomic_write_bytes(out_dir / PLOT_NAME, png)
        report["plots"] = [PLOT_NAME]
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", render_markdown(report))
    return report
