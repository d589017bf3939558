"""``dsv synth search-qa``: question -> search -> verified answer, by a proposer and a solver agent.

Over a local document collection (``dsv.synth.searchqa_env``: a folder of text, Markdown or
HTML, indexed with BM25), item ``i`` (``0..n-1``) goes through

1. the seed: documents ranked from the long tail, those whose title the fewest other documents
   mention first (ties by id); item ``i`` starts from the ``i``-th (cycling);
2. the proposer: an agent with the search and read tools, through any OpenAI-compatible
   endpoint, writes a multi-hop question about the seed with a claimed answer and evidence
   (quotes from the documents it read), as one JSON object; the proposal and its conversation
   are saved to ``OUT/proposals/<i>.json``;
3. the checks on the host: each quote must appear in the document it cites, the evidence must
   span ``min_hops`` documents, the answer must appear in the evidence and not in the question,
   and the question must not be a near-duplicate of one already kept (here or in ``existing``
   task files; word-shingle Jaccard, as ``dsv synth build`` compares prompts);
4. the solver: a separate agent that sees only the question and the tools answers it as a
   ``search_qa`` episode (``dsv.synth.episode.run_episode``), so it plays exactly what
   ``dsv eval`` and ``dsv rl`` will run;
5. the verifier: the item is kept only when the solver's answer equals the claimed one
   (normalised). A rejected item keeps its reason (``no_evidence``, ``evidence_not_found``,
   ``answer_not_supported``, ``not_multi_hop``, ``answer_in_question``, ``duplicate``,
   ``solver_not_found``, ``answers_disagree``, ``malformed``).

Kept items become ``search_qa`` tasks in ``OUT/tasks.jsonl``. Each carries the corpus (gzip, base64)
and its sha256, so the task file keeps working wherever it is moved; a corpus over
``embed_corpus_mb`` is named by the absolute path of ``OUT/corpus.jsonl`` instead. ``OUT/state.json`` is written after each item, so a re-run skips finished items and
retries those that failed to reach the endpoint; ``OUT/report.json`` / ``.md`` count the reasons.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dsv.synth.env import AnswerFormatError, Environment, Score, Task, ToolCallRecord
from dsv.synth.episode import run_episode
from dsv.synth.eval._io import atomic_write_json, atomic_write_text
from dsv.synth.eval.client import EndpointClient, EndpointError
from dsv.synth.pipeline.dedup import jaccard, prompt_shingles
from dsv.synth.searchqa_env import (
    Document,
    SearchIndex,
    SearchQaEnv,
    embed_corpus,
    load_documents,
    normalize_answer,
    search_tools,
    write_corpus_file,
)
from dsv.synth.tools import tool_schema

__all__ = [
    "PROPOSER_INSTRUCTIONS",
    "ItemOutcome",
    "SearchQaConfig",
    "build_search_qa",
    "check_proposal",
    "long_tail_order",
]

STATE_VERSION = 1
_NOT_FOUND = re.compile(
    r"\b(unknown|not found|cannot find|can't find|could not find|no answer|unanswerable)\b", re.I
)

PROPOSER_INSTRUCTIONS = """\
You write hard questions for training search agents. You have `search` and `read` tools over a
document collection. Starting from the seed entity you are given, read its document, follow what it
mentions to other documents, and write one multi-hop question whose answer needs facts from at least
two documents (for example: the birthplace of the founder of X). The answer must be a short name,
number or date stated in the documents, and must not appear in the question.
When done, reply (without tool calls) with one JSON object:
{"question": "...", "answer": "...", "evidence": [{"doc": "<document id>", "quote": "<exact sentence copied from it>"}, ...]}
"""

SOLVER_FORMAT = (
    "Finish with one line `Answer: <answer>` (write `Answer: unknown` if the documents do not say)."
)


@dataclass
class SearchQaConfig:
    """Settings of one ``dsv synth search-qa`` run."""

    out_dir: Path
    corpus_dir: Path
    n: int = 10
    min_hops: int = 2
    proposer_turns: int = 12
    solver_turns: int = 12
    duplicate_threshold: float = 0.75
    existing: tuple[Path, ...] = ()
    thinking: bool | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    # Tasks carry the corpus (gzip, base64) when it is at most this big, so the task file can be
    # moved or shared alone; a bigger corpus is named by the path of OUT/corpus.jsonl instead.
    embed_corpus_mb: float = 2.0


@dataclass
class ItemOutcome:
    """What happened to one item: ``accepted``, ``rejected`` (with a category) or ``error`` (retried)."""

    index: int
    status: str
    category: str
    reason: str
    seed: str = ""
    question: str = ""
    answer: str = ""
    solver_answer: str | None = None
    solver_tool_calls: int = 0
    wall_s: float = 0.0
    task_id: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("accepted", "rejected")


def long_tail_order(docs: Sequence[Document]) -> list[Document]:
    """Documents ordered from the long tail: fewest other documents mentioning their title first."""
    lowered = [d.text.lower() for d in docs]
    mentions = {}
    for i, d in enumerate(docs):
        title = d.title.lower()
        mentions[d.id] = sum(1 for j, text in enumerate(lowered) if j != i and title and title in text)
    return sorted(docs, key=lambda d: (mentions[d.id], d.id))


def _squash(text: str) -> str:
    return " ".join(str(text).lower().split())


def check_proposal(
    proposal: Any, docs: dict[str, Document], min_hops: int, kept: Sequence[str], threshold: float
) -> tuple[str, str] | None:
    """(category, reason) when a proposal fails the host's checks (see the module doc), else None."""
    if not isinstance(proposal, dict):
        return "malformed", "the proposal is not a JSON object"
    question, answer, evidence = proposal.get("question"), proposal.get("answer"), proposal.get("evidence")
    if not isinstance(question, str) or not question.strip():
        return "malformed", "the proposal has no question"
    if (
        not isinstance(answer, (str, int, float))
        or isinstance(answer, bool)
        or not normalize_answer(str(answer))
    ):
        return "malformed", "the proposal has no short answer"
    answer = str(answer)
    if not evidence:
        return "no_evidence", "the claimed answer comes without evidence"
    if not isinstance(evidence, list) or not all(isinstance(e, dict) for e in evidence):
        return "malformed", 'evidence must be a list of {"doc", "quote"} objects'
    for e in evidence:
        doc = docs.get(str(e.get("doc")))
        quote = str(e.get("quote") or "")
        if doc is None:
            return "evidence_not_found", f"evidence cites {e.get('doc')!r}, which is not in the collection"
        if not quote.strip() or _squash(quote) not in _squash(doc.text):
            return "evidence_not_found", f"the quote {quote[:80]!r} is not in {doc.id}"
    cited = {str(e["doc"]) for e in evidence}
    if len(cited) < min_hops:
        return "not_multi_hop", f"the evidence spans {len(cited)} document(s); {min_hops} are needed"
    if normalize_answer(answer) not in normalize_answer(" ".join(str(e["quote"]) for e in evidence)):
        return "answer_not_supported", f"no evidence quote states the answer {answer!r}"
    if normalize_answer(answer) in normalize_answer(question):
        return "answer_in_question", "the question gives its answer away"
    shingles = prompt_shingles(question)
    for other in kept:
        score = jaccard(shingles, prompt_shingles(other))
        if score >= threshold:
            return (
                "duplicate",
                f"near-duplicate (word Jaccard {score:.2f}) of the kept question {other[:80]!r}",
            )
    return None


class _ProposerEnv(Environment):
    """The proposer's episode: its final message is parsed as the proposal and never scored."""

    name = "search_qa_proposer"
    domain = "search"
    description = "proposer side of dsv synth search-qa"

    def __init__(self, index: SearchIndex) -> None:
        self.index = index

    def generate(self, seed: int, difficulty: int = 2) -> Task:
        raise NotImplementedError("proposer tasks are built by the pipeline")

    def tools(self, task: Task) -> list[Callable[..., Any]]:
        return search_tools(self.index)

    def parse_answer(self, text: str) -> Any:
        blocks = re.findall(r"```(?:json)?[ \t]*\n(.*?)```", text, re.DOTALL)
        raw = blocks[-1] if blocks else text[text.find("{") : text.rfind("}") + 1]
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise AnswerFormatError("the proposal is not one JSON object") from None

    def solve(self, task: Task) -> Any:
        raise NotImplementedError

    def verify(self, task: Task, answer: Any, trace: list[ToolCallRecord] | None = None) -> Score:
        return Score.ok("proposal received")


def _policy(client: EndpointClient, config: SearchQaConfig) -> Any:
    from dsv.synth.eval.policies import EndpointPolicyFactory

    return EndpointPolicyFactory(
        client, thinking=bool(config.thinking), max_tokens=config.max_tokens, temperature=config.temperature
    )(0)


def _load_state(path: Path) -> dict[str, Any]:
    if path.exists():
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(state, dict) and state.get("version") == STATE_VERSION:
                state.setdefault("items", {})
                return state
        except json.JSONDecodeError:
            pass  # written atomically: an unreadable state was not written by this pipeline
    return {"version": STATE_VERSION, "items": {}}


def _existing_questions(paths: Sequence[Path]) -> list[str]:
    from dsv.synth.tasks import read_tasks

    out = []
    for p in paths:
        if Path(p).exists():
            out += [t.state.get("question", t.prompt) for t in read_tasks(p, on_bad_record="skip")
                    if t.family == SearchQaEnv.name]  # fmt: skip
    return out


def _propose(
    i: int, seed: Document, client: EndpointClient, config: SearchQaConfig, index: SearchIndex, out_dir: Path
) -> dict[str, Any]:
    """The saved proposal of item ``i`` or a new one (raises ``EndpointError`` when the endpoint fails)."""
    path = out_dir / "proposals" / f"{i:04d}.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    env = _ProposerEnv(index)
    prompt = (
        f"{PROPOSER_INSTRUCTIONS}\nSeed entity: {seed.title} (document id {seed.id!r}). "
        "Read it, follow its links with search, then reply with the JSON object."
    )
    fns = env.tools(Task("proposer", env.name, i, 2, "", [], {}, ""))
    task = Task(f"proposer-{i}", env.name, i, 2, prompt, [tool_schema(f) for f in fns], {}, "")
    policy = _policy(client, config)
    result = run_episode(env, task, policy, max_turns=config.proposer_turns)
    if isinstance(policy.error, EndpointError):
        raise policy.error
    record = {
        "seed": seed.id,
        "proposal": result.answer if result.score.passed else None,
        "problem": "" if result.score.passed else result.score.reason,
        "messages": result.messages,
    }
    atomic_write_json(path, record)
    return record


def _judge(
    i: int,
    seed: Document,
    client: EndpointClient,
    config: SearchQaConfig,
    index: SearchIndex,
    corpus: dict[str, Any],
    kept: list[str],
) -> tuple[ItemOutcome, Task | None]:
    start = time.perf_counter()
    record = _propose(i, seed, client, config, index, Path(config.out_dir))

    def out(status: str, category: str, reason: str, **kw: Any) -> ItemOutcome:
        return ItemOutcome(i, status, category, reason, seed=seed.id,
                           wall_s=round(time.perf_counter() - start, 3), **kw)  # fmt: skip

    proposal = record["proposal"]
    if proposal is None:
        return out("rejected", "malformed", f"no usable proposal: {record['problem']}"), None
    bad = check_proposal(proposal, index.docs, config.min_hops, kept, config.duplicate_threshold)
    question, answer = str(proposal.get("question", "")), str(proposal.get("answer", ""))
    if bad is not None:
        return out("rejected", bad[0], bad[1], question=question, answer=answer), None
    evidence = [
        {"doc": str(e["doc"]), "title": index.docs[str(e["doc"])].title, "quote": str(e["quote"])}
        for e in proposal["evidence"]
    ]
    hops = len({e["doc"] for e in evidence})
    env = SearchQaEnv()
    state = {"question": question, "answer": answer, "evidence": evidence, "seed": seed.id, "corpus": corpus}
    tools = [tool_schema(f) for f in search_tools(index)]
    task = Task(
        f"search_qa-{corpus['sha256'][:8]}-{i}", env.name, i, max(1, min(5, hops)), question, tools, state,
        SOLVER_FORMAT,
    )  # fmt: skip
    policy = _policy(client, config)
    result = run_episode(env, task, policy, max_turns=config.solver_turns)
    if isinstance(policy.error, EndpointError):
        raise policy.error
    said = result.answer if result.answer is not None else result.answer_text
    kw = {"question": question, "answer": answer, "solver_answer": None if said is None else str(said),
          "solver_tool_calls": result.tool_calls}  # fmt: skip
    if result.score.passed:
        return out(
            "accepted", "accepted", f"the solver found {answer!r} independently", task_id=task.id, **kw
        ), task
    if said is None or _NOT_FOUND.search(str(said)) or not normalize_answer(str(said)):
        return out("rejected", "solver_not_found", f"the solver did not find an answer ({result.score.reason})",
                   **kw), None  # fmt: skip
    return out("rejected", "answers_disagree", f"the solver answered {str(said)!r}, the proposer claimed {answer!r}",
               **kw), None  # fmt: skip


def build_search_qa(
    client: EndpointClient,
    config: SearchQaConfig,
    *,
    on_start: Callable[[int, int], None] | None = None,
    on_item: Callable[[ItemOutcome], None] | None = None,
    on_begin: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the simulation for items ``0..n-1``; write tasks and report, return the report.

    An interrupt (Ctrl-C) writes the task file and report of what finished, then propagates.
    """
    from dsv.synth.tasks import write_tasks

    out_dir = Path(config.out_dir)
    (out_dir / "proposals").mkdir(parents=True, exist_ok=True)
    (out_dir / "items").mkdir(parents=True, exist_ok=True)
    docs = load_documents(config.corpus_dir)
    corpus_path = (out_dir / "corpus.jsonl").resolve()
    sha = write_corpus_file(corpus_path, docs)
    corpus: dict[str, Any] = {"path": str(corpus_path), "sha256": sha, "documents": len(docs)}
    embedded = embed_corpus(docs)
    if len(embedded) <= config.embed_corpus_mb * 1e6:
        corpus = {**corpus, "path": corpus_path.name, "data": embedded}
    index = SearchIndex(docs)
    order = long_tail_order(docs)
    state_path = out_dir / "state.json"
    state = _load_state(state_path)
    if state.get("corpus_sha256") not in (None, sha):
        raise ValueError(
            f"{out_dir} was built from another version of the collection; use a new --out for {config.corpus_dir}"
        )
    state["corpus_sha256"] = sha
    done = {int(k) for k, v in state["items"].items() if v.get("status") in ("accepted", "rejected")}
    if on_start is not None:
        on_start(config.n, len(done & set(range(config.n))))
    kept = _existing_questions(config.existing) + [
        v["question"]
        for _, v in sorted(state["items"].items(), key=lambda kv: int(kv[0]))
        if v["status"] == "accepted"
    ]
    try:
        for i in range(config.n):
            if i in done:
                continue
            if on_begin is not None:
                on_begin(i)
            seed = order[i % len(order)]
            try:
                outcome, task = _judge(i, seed, client, config, index, corpus, kept)
            except EndpointError as exc:
                outcome, task = ItemOutcome(i, "error", "endpoint_error", str(exc)[:500], seed=seed.id), None
            if task is not None:
                atomic_write_json(out_dir / "items" / f"{i:04d}.json", task.to_json())
                kept.append(outcome.question)
            state["items"][str(i)] = asdict(outcome)
            atomic_write_json(state_path, state)
            if on_item is not None:
                on_item(outcome)
    finally:  # also on Ctrl-C
        tasks = [
            Task.from_json(json.loads((out_dir / "items" / f"{i:04d}.json").read_text(encoding="utf-8")))
            for i in range(config.n)
            if state["items"].get(str(i), {}).get("status") == "accepted"
        ]
        write_tasks(out_dir / "tasks.jsonl", tasks)
        report = _write_report(client, config, state, corpus, out_dir)
    return report


def _write_report(
    client: EndpointClient,
    config: SearchQaConfig,
    state: dict[str, Any],
    corpus: dict[str, Any],
    out_dir: Path,
) -> dict[str, Any]:
    rows = [state["items"][str(i)] for i in range(config.n) if str(i) in state["items"]]
    statuses = Counter(r["status"] for r in rows)
    judged = statuses.get("accepted", 0) + statuses.get("rejected", 0)
    report = {
        "endpoint": client.base_url,
        "model": client.model,
        "corpus": {k: v for k, v in corpus.items() if k != "data"} | {"embedded": "data" in corpus},
        "tasks": str(out_dir / "tasks.jsonl"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "counts": {
            "total": config.n,
            "accepted": statuses.get("accepted", 0),
            "rejected": statuses.get("rejected", 0),
            "error": statuses.get("error", 0),
            "pending": config.n - len(rows),
        },
        "acceptance_rate": round(statuses.get("accepted", 0) / judged, 3) if judged else None,
        "by_category": dict(Counter(r["category"] for r in rows).most_common()),
        "items": rows,
    }
    atomic_write_json(out_dir / "report.json", report)
    lines = ["# dsv synth search-qa report", ""]
    for key in ("endpoint", "model", "tasks", "finished", "acceptance_rate"):
        lines.append(f"- {key}: `{report[key]}`")
    c = report["counts"]
    where = "embedded in every task" if "data" in corpus else "named by path in the tasks"
    lines += [f"- corpus: `{corpus['path']}` ({corpus['documents']} documents, {where})", "",
              f"{c['accepted']} accepted, {c['rejected']} rejected, {c['error']} endpoint errors (of {c['total']}).",
              "", "| reason | count |", "|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v} |" for k, v in report["by_category"].items()]
    lines += ["", "| # | status | category | question | reason |", "|---|---|---|---|---|"]
    for r in rows:
        cells = [str(x).replace("|", "\\|").replace("\n", " ") for x in (r["question"][:80], r["reason"])]
        lines.append(f"| {r['index']} | {r['status']} | {r['category']} | {cells[0]} | {cells[1]} |")
    atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")
    return report
