"""``dsv synth build``: an LLM proposes environments; the sandbox and the checks decide which to keep.

For proposal ``i`` (``0..n-1``) the pipeline

1. asks the endpoint for a proposal (``dsv.synth.pipeline.proposal``: one python block
   defining ``ProposedEnv``) and saves the raw reply to ``OUT/proposals/<i>.md``;
2. parses it on the host without running it (syntax, the class, stdlib-only imports);
3. runs the acceptance checks in the sandbox (``dsv.synth.pipeline.harness``): for every
   (seed, difficulty) the task is deterministic and JSON-clean, the reference answer
   passes (also after a text round-trip), and every perturbed or junk answer fails;
4. rejects names already taken and near-duplicates of the built-in families or of
   environments accepted earlier (``dsv.synth.pipeline.dedup``);
5. stores an accepted environment in the library (``dsv.synth.pipeline.library``).

After each proposal the outcome is written to ``OUT/state.json`` (atomically), so a
re-run skips finished proposals and re-asks only those that failed to reach the
endpoint. ``OUT/report.json`` and ``OUT/report.md`` count accept/reject reasons.

Library use: ``build(EndpointClient(url, model), BuildConfig(out_dir=...))``.
"""

from __future__ import annotations

import inspect
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dsv.synth.eval._io import atomic_write_json, atomic_write_text
from dsv.synth.eval.client import EndpointClient, EndpointError
from dsv.synth.pipeline.dedup import Fingerprint, find_duplicate
from dsv.synth.pipeline.harness import HarnessError, default_limits, run_harness
from dsv.synth.pipeline.library import Library
from dsv.synth.pipeline.proposal import ProposalFormatError, build_messages, extract_code, static_check
from dsv.synth.sandbox import Limits

__all__ = ["BuildConfig", "ProposalOutcome", "build", "builtin_fingerprints", "check_proposal"]

STATE_VERSION = 1
_NETWORK_HINTS = (
    "Network is unreachable",
    "Errno 101",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Connection refused",
)


@dataclass
class BuildConfig:
    """Settings of one ``dsv synth build`` run."""

    out_dir: Path
    library_dir: Path | None = None  # default: OUT/library
    n: int = 10
    seeds: tuple[int, ...] = (0, 1, 2)
    difficulties: tuple[int, ...] = (1, 3)
    code_threshold: float = 0.6
    containment_threshold: float = 0.8
    prompt_threshold: float = 0.75
    n_prompts: int = 4
    max_task_chars: int = 20_000
    limits: Limits = field(default_factory=default_limits)
    thinking: bool | None = None
    temperature: float | None = None
    max_tokens: int | None = None

    @property
    def library(self) -> Path:
        return self.library_dir if self.library_dir is not None else self.out_dir / "library"


@dataclass
class ProposalOutcome:
    """What happened to one proposal: ``accepted``, ``rejected`` (with a category) or ``error`` (retried)."""

    index: int
    status: str
    category: str
    reason: str
    name: str | None = None
    closest: dict[str, Any] | None = None
    wall_s: float = 0.0

    @property
    def finished(self) -> bool:
        return self.status in ("accepted", "rejected")


def builtin_fingerprints(n_prompts: int = 3) -> list[Fingerprint]:
    """Fingerprints of the built-in families (trusted code: their source and prompts come from this process)."""
    from dsv.synth import registry

    out = []
    for name, cls in registry.families().items():
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            source = ""
        prompts = []
        env = cls()
        for seed in range(n_prompts):
            try:
                prompts.append(env.generate(seed, 2).prompt)
            except Exception:  # a family that cannot make a sample simply contributes fewer prompts
                continue
        out.append(Fingerprint.build(name, "builtin", source, prompts))
    return out


def _library_fingerprints(library: Library) -> list[Fingerprint]:
    out = []
    for name in library.names():
        manifest = library.manifest(name)
        out.append(Fingerprint.build(name, "accepted", library.source(name), manifest.get("prompts", [])))
    return out


def check_proposal(
    index: int,
    reply: str,
    config: BuildConfig,
    references: list[Fingerprint],
    taken_names: set[str],
) -> tuple[ProposalOutcome, str | None, dict[str, Any] | None]:
    """Judge one reply; returns the outcome and, when accepted, the code and the sandbox's check data."""
    start = time.perf_counter()

    def out(status: str, category: str, reason: str, **kw: Any) -> ProposalOutcome:
        return ProposalOutcome(
            index, status, category, reason, wall_s=round(time.perf_counter() - start, 3), **kw
        )

    try:
        code = extract_code(reply)
        info = static_check(code)
    except ProposalFormatError as exc:
        return out("rejected", exc.category, str(exc)), None, None
    if info.declared_name in taken_names:
        return (
            out(
                "rejected",
                "name_taken",
                f"name {info.declared_name!r} is already taken",
                name=info.declared_name,
            ),
            None,
            None,
        )
    request = {
        "mode": "check",
        "seeds": list(config.seeds),
        "difficulties": list(config.difficulties),
        "max_task_chars": config.max_task_chars,
        "n_prompts": config.n_prompts,
    }
    try:
        data = run_harness(code, request, limits=config.limits).data
    except HarnessError as exc:
        return out("rejected", exc.category, str(exc), name=info.declared_name), None, None
    if not data.get("ok"):
        category, reason = str(data.get("category", "crash")), str(data.get("reason", "check failed"))
        if category == "crash" and any(h in reason for h in _NETWORK_HINTS):
            category = "network"
            reason = f"network access attempted (blocked by the sandbox): {reason}"
        return out("rejected", category, reason, name=info.declared_name), None, None
    name = str(data["name"])
    if name in taken_names:
        return out("rejected", "name_taken", f"name {name!r} is already taken", name=name), None, None
    candidate = Fingerprint.build(name, "candidate", code, data.get("prompts", []))
    match = find_duplicate(
        candidate,
        references,
        code_threshold=config.code_threshold,
        prompt_threshold=config.prompt_threshold,
        containment_threshold=config.containment_threshold,
    )
    closest = None
    if match is not None:
        closest = {
            "name": match.name,
            "kind": match.kind,
            "code_similarity": round(match.code_similarity, 3),
            "code_containment": round(match.code_containment, 3),
            "prompt_similarity": round(match.prompt_similarity, 3),
        }
        if match.duplicate:
            category = "duplicate_builtin" if match.kind == "builtin" else "duplicate_accepted"
            reason = (
                f"near-duplicate of {match.kind} environment {match.name!r} "
                f"(code Jaccard {match.code_similarity:.2f}, code containment {match.code_containment:.2f}, "
                f"prompt similarity {match.prompt_similarity:.2f})"
            )
            return out("rejected", category, reason, name=name, closest=closest), None, None
    return out("accepted", "accepted", "passed all checks", name=name, closest=closest), code, data


def _load_state(path: Path, model: str) -> dict[str, Any]:
    import json

    if path.exists():
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(state, dict) and state.get("version") == STATE_VERSION:
                state.setdefault("proposals", {})
                return state
        except json.JSONDecodeError:
            pass  # state is written atomically; an unreadable one was not written by us: start over
    return {"version": STATE_VERSION, "model": model, "proposals": {}}


def _render_markdown(report: dict[str, Any]) -> str:
    lines = ["# dsv synth build report", ""]
    for key in ("endpoint", "model", "library", "finished"):
        lines.append(f"- {key}: `{report[key]}`")
    c = report["counts"]
    lines += [
        "",
        f"{c['accepted']} accepted, {c['rejected']} rejected, {c['error']} endpoint errors "
        f"(of {c['total']} proposals).",
        "",
        "| reason | count |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in report["by_category"].items()]
    lines += ["", "| # | status | name | reason |", "|---|---|---|---|"]
    for p in report["proposals"]:
        reason = str(p["reason"]).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {p['index']} | {p['status']} | {p['name'] or ''} | {reason} |")
    return "\n".join(lines) + "\n"


def build(
    client: EndpointClient,
    config: BuildConfig,
    *,
    on_start: Callable[[int, int], None] | None = None,
    on_proposal: Callable[[ProposalOutcome], None] | None = None,
    on_request: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the pipeline for proposals ``0..n-1``; write and return the report.

    ``on_request(i)`` is called before proposal ``i`` is asked of the endpoint (a reply can take
    minutes). An interrupt (Ctrl-C) writes the report of the proposals finished so far, then
    propagates; a re-run resumes.
    """
    out_dir = Path(config.out_dir)
    (out_dir / "proposals").mkdir(parents=True, exist_ok=True)
    library = Library(config.library)
    state_path = out_dir / "state.json"
    state = _load_state(state_path, client.model)
    done = {int(k) for k, v in state["proposals"].items() if v.get("status") in ("accepted", "rejected")}
    if on_start is not None:
        on_start(config.n, len(done & set(range(config.n))))
    references = builtin_fingerprints() + _library_fingerprints(library)
    try:
        _propose_all(client, config, library, state, state_path, done, references, on_proposal, on_request)
    finally:  # also on Ctrl-C: the report of what finished is written before the run ends
        report = _write_report(client, config, state, out_dir)
    return report


def _propose_all(
    client: EndpointClient,
    config: BuildConfig,
    library: Library,
    state: dict[str, Any],
    state_path: Path,
    done: set[int],
    references: list[Fingerprint],
    on_proposal: Callable[[ProposalOutcome], None] | None,
    on_request: Callable[[int], None] | None,
) -> None:
    from dsv.synth import registry

    out_dir = Path(config.out_dir)
    for i in range(config.n):
        if i in done:
            continue
        reply_path = out_dir / "proposals" / f"{i:04d}.md"
        if reply_path.exists():
            reply = reply_path.read_text(encoding="utf-8")
        else:
            existing = [(n, cls.description) for n, cls in registry.families().items()]
            existing += [(n, str(library.manifest(n).get("description", ""))) for n in library.names()]
            if on_request is not None:
                on_request(i)
            try:
                answer = client.chat(
                    build_messages(i, existing),
                    thinking=config.thinking,
                    temperature=config.temperature,
                    max_tokens=config.max_tokens,
                )
            except EndpointError as exc:
                outcome = ProposalOutcome(i, "error", "endpoint_error", str(exc)[:500])
                state["proposals"][str(i)] = asdict(outcome)
                atomic_write_json(state_path, state)
                if on_proposal is not None:
                    on_proposal(outcome)
                continue
            reply = str(answer.message.get("content") or "")
            atomic_write_text(reply_path, reply)
        taken = set(registry.families()) | set(library.names())
        outcome, code, data = check_proposal(i, reply, config, references, taken)
        if outcome.status == "accepted" and code is not None and data is not None:
            manifest = {
                "domain": data["domain"],
                "description": data["description"],
                "proposal": i,
                "model": client.model,
                "endpoint": client.base_url,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "prompts": data["prompts"],
                "tools": data["tools"],
                "answer_types": data["answer_types"],
                "checks": {
                    "seeds": list(config.seeds),
                    "difficulties": list(config.difficulties),
                    "tasks_checked": data["tasks_checked"],
                    "wrong_answers_checked": data["wrong_answers_checked"],
                },
                "closest": outcome.closest,
            }
            library.add(outcome.name or data["name"], code, manifest)
            references.append(Fingerprint.build(data["name"], "accepted", code, data["prompts"]))
        state["proposals"][str(i)] = asdict(outcome)
        atomic_write_json(state_path, state)
        if on_proposal is not None:
            on_proposal(outcome)


def _write_report(client: EndpointClient, config: BuildConfig, state: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    proposals = [state["proposals"][str(i)] for i in range(config.n) if str(i) in state["proposals"]]
    statuses = Counter(p["status"] for p in proposals)
    report = {
        "endpoint": client.base_url,
        "model": client.model,
        "library": str(config.library),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "counts": {
            "total": config.n,
            "accepted": statuses.get("accepted", 0),
            "rejected": statuses.get("rejected", 0),
            "error": statuses.get("error", 0),
            "pending": config.n - len(proposals),
        },
        "by_category": dict(Counter(p["category"] for p in proposals).most_common()),
        "proposals": proposals,
    }
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", _render_markdown(report))
    return report
