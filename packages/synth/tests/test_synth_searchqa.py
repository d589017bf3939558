"""`dsv synth search-qa` end to end: a small document collection, scripted proposer and solver agents on loopback.

The collection is an invented world (Markdown, text and HTML files), so nothing can be known
without searching it. The scripted endpoint plays both agents over real HTTP: the proposer
reads its seed document and proposes; the solver searches and reads like a model would, in a
real `search_qa` episode. Kept: agreeing answers with supporting evidence. Rejected, each with
its reason: a wrong claimed answer, an answer the solver cannot find, an answer without
evidence, a quote the document does not contain, and a repeated question.

Run: pytest packages/synth/tests/test_synth_searchqa.py
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("tantivy")

from dsv.synth import registry, searchqa_env
from dsv.synth.episode import run_episode
from dsv.synth.eval.client import EndpointClient
from dsv.synth.pipeline.search_qa import SearchQaConfig, build_search_qa, long_tail_order
from dsv.synth.searchqa_env import SearchIndex, load_documents, normalize_answer
from dsv.synth.tasks import read_tasks


def _load_scripted():
    path = Path(__file__).with_name("scripted_endpoint.py")
    spec = importlib.util.spec_from_file_location("dsv_synth_tests_scripted_endpoint", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


se = _load_scripted()
pytestmark = pytest.mark.xdist_group("synth_searchqa")

DOCS = {
    "kelvar_mills.md": "# Kelvar Mills\n\nKelvar Mills is a textile works on the Sell River. "
    "Kelvar Mills was founded in 1843 by Ada Renn.\n",
    "ada_renn.txt": "Ada Renn\n\nAda Renn was born in Tolbury. She trained as a weaver under Otto Brask.\n",
    "tolbury.html": "<html><head><title>Tolbury</title><style>p {color: red}</style></head><body>"
    "<p>Tolbury is a market town on the Dun River.</p><p>It is twinned with Quoran.</p>"
    "<script>var hidden = 'Sell River';</script></body></html>",
    "brannock_works.md": "# Brannock Works\n\nBrannock Works was founded by Ilse Varn in 1901.\n",
    "ilse_varn.txt": "Ilse Varn\n\nIlse Varn was born in Quoran and later lived in Tolbury.\n",
    "quoran.md": "# Quoran\n\nQuoran is a village on the Sell River.\n",
    "sell_river.md": "# Sell River\n\nThe Sell River rises near Quoran.\n",
    "dun_river.md": "# Dun River\n\nThe Dun River flows through Tolbury.\n",
    "otto_brask.md": "# Otto Brask\n\nOtto Brask was a weaver born in Mirefield.\n",
}

GOOD_Q = "In which village was the founder of Brannock Works born?"
PROPOSALS = {  # by seed title; the long-tail order puts these seeds at items 0..5
    "Brannock Works": {"question": GOOD_Q, "answer": "Quoran", "evidence": [
        {"doc": "brannock_works.md", "quote": "Brannock Works was founded by Ilse Varn in 1901."},
        {"doc": "ilse_varn.txt", "quote": "Ilse Varn was born in Quoran"}]},
    "Kelvar Mills": {"question": "On which river lies the birthplace of the founder of Kelvar Mills?",
                     "answer": "Sell River", "evidence": [
        {"doc": "kelvar_mills.md", "quote": "Kelvar Mills is a textile works on the Sell River."},
        {"doc": "ada_renn.txt", "quote": "Ada Renn was born in Tolbury."}]},
    "Ada Renn": {"question": "Where was the weaving teacher of Ada Renn born?", "answer": "Mirefield", "evidence": [
        {"doc": "ada_renn.txt", "quote": "She trained as a weaver under Otto Brask."},
        {"doc": "otto_brask.md", "quote": "Otto Brask was a weaver born in Mirefield."}]},
    "Dun River": {"question": "Which town does the Dun River flow through?", "answer": "Tolbury", "evidence": []},
    "Ilse Varn": {"question": "Where was the founder of Brannock Works educated?", "answer": "Mirefield", "evidence": [
        {"doc": "brannock_works.md", "quote": "Brannock Works was founded by Ilse Varn in 1901."},
        {"doc": "ilse_varn.txt", "quote": "Ilse Varn studied in Mirefield."}]},
    "Otto Brask": {"question": GOOD_Q.replace("?", " ?"), "answer": "Quoran", "evidence": [
        {"doc": "brannock_works.md", "quote": "Brannock Works was founded by Ilse Varn in 1901."},
        {"doc": "ilse_varn.txt", "quote": "Ilse Varn was born in Quoran"}]},
}  # fmt: skip

# what the solver does for each question, turn by turn (a tool call or the final text)
SOLVER = {
    GOOD_Q: [("search", {"query": "Brannock Works founder"}), ("read", {"doc_id": "brannock_works.md"}),
             ("search", {"query": "Ilse Varn born"}), "The founder, Ilse Varn, was born in Quoran.\nAnswer: Quoran"],
    PROPOSALS["Kelvar Mills"]["question"]: [("search", {"query": "Kelvar Mills founded"}),
                                            ("search", {"query": "Ada Renn born"}),
                                            ("read", {"doc_id": "tolbury.html"}), "Answer: Dun River"],
    PROPOSALS["Ada Renn"]["question"]: [("search", {"query": "Ada Renn teacher"}),
                                        "The documents do not say. Answer: unknown"],
}  # fmt: skip


def agents(body: dict) -> se.Reply:
    messages = body["messages"]
    first = str(messages[0]["content"])
    turn = sum(m["role"] == "assistant" for m in messages)
    if "Seed entity:" in first:  # the proposer: read the seed, then propose
        seed = first.split("Seed entity: ", 1)[1].split(" (document id", 1)[0]
        doc_id = first.split("(document id '", 1)[1].split("'", 1)[0]
        if turn == 0:
            return se.Reply(tool_calls=[{"name": "read", "arguments": {"doc_id": doc_id}}])
        return se.Reply(content="```json\n" + json.dumps(PROPOSALS[seed]) + "\n```")
    question = first.split("\n\n", 1)[0]
    step = SOLVER[question][turn]
    if isinstance(step, str):
        return se.Reply(content=step)
    return se.Reply(tool_calls=[{"name": step[0], "arguments": step[1]}])


def _write_docs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    (folder / "notes.bin").write_bytes(b"\0\1")  # not a document type: ignored
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("searchqa")
    docs = _write_docs(root / "docs")
    config = SearchQaConfig(out_dir=root / "out", corpus_dir=docs, n=6)
    with se.ScriptedEndpoint(agents) as endpoint:
        client = EndpointClient(endpoint.base_url, endpoint.model, max_retries=0)
        report = build_search_qa(client, config)
        asked = len(endpoint.requests)
        again = build_search_qa(client, config)
        asked_again = len(endpoint.requests) - asked
        client.close()
    return {"root": root, "out": root / "out", "report": report, "again": again, "asked": asked,
            "asked_again": asked_again}  # fmt: skip


def test_documents_load_and_rank_from_the_long_tail(tmp_path: Path) -> None:
    docs = load_documents(_write_docs(tmp_path / "d"))
    by_id = {d.id: d for d in docs}
    assert len(docs) == len(DOCS)
    assert by_id["tolbury.html"].title == "Tolbury" and "Sell River" not in by_id["tolbury.html"].text
    assert by_id["ada_renn.txt"].title == "Ada Renn" and by_id["quoran.md"].title == "Quoran"
    order = [d.title for d in long_tail_order(docs)]
    assert order[:6] == ["Brannock Works", "Kelvar Mills", "Ada Renn", "Dun River", "Ilse Varn", "Otto Brask"]
    index = SearchIndex(docs)
    assert index.search("who founded Brannock Works", 3)[0].id == "brannock_works.md"
    assert index.search("Ilse Varn birthplace", 3)[0].id == "ilse_varn.txt"
    # agent queries are words, never query syntax: stray operators neither fail nor match
    assert index.search("(((", 3) == [] and index.search('Quoran AND ("', 3)[0].id == "quoran.md"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="holds no non-empty"):
        load_documents(tmp_path / "empty")


def test_agreeing_answers_with_evidence_are_kept_and_the_others_rejected_with_reasons(built) -> None:
    items = {r["index"]: r for r in built["report"]["items"]}
    assert [items[i]["category"] for i in range(6)] == [
        "accepted", "answers_disagree", "solver_not_found", "no_evidence", "evidence_not_found", "duplicate",
    ]  # fmt: skip
    assert items[0]["solver_answer"] == "Quoran" and items[0]["solver_tool_calls"] == 3
    assert "'Dun River'" in items[1]["reason"] and "'Sell River'" in items[1]["reason"]
    assert "without evidence" in items[3]["reason"] and "is not in ilse_varn.txt" in items[4]["reason"]
    assert built["report"]["counts"] == {"total": 6, "accepted": 1, "rejected": 5, "error": 0, "pending": 0}
    md = (built["out"] / "report.md").read_text()
    assert "| answers_disagree | 1 |" in md and "| solver_not_found | 1 |" in md
    # the proposer used its tools, and its conversation is kept with the proposal
    saved = json.loads((built["out"] / "proposals" / "0000.json").read_text())
    assert saved["seed"] == "brannock_works.md" and saved["messages"][2]["role"] == "tool"
    assert "Brannock Works was founded" in saved["messages"][2]["content"]


def test_rerun_resumes_without_asking_the_agents_again(built) -> None:
    assert built["asked_again"] == 0 and built["again"]["counts"] == built["report"]["counts"]


def test_kept_items_are_a_family_for_eval_and_rl_with_the_same_search_tools(built) -> None:
    (task,) = read_tasks(built["out"] / "tasks.jsonl")
    env = registry.get(task.family)
    assert task.family == "search_qa" and task.prompt == GOOD_Q and task.difficulty == 2
    assert [t["function"]["name"] for t in task.tools] == ["search", "read"] == list(type(env).tool_names)
    assert env.verify(task, env.solve(task)).passed and env.verify(task, "the quoran.").passed
    assert not env.verify(task, "Tolbury").passed and not env.verify(task, ["Quoran"]).passed
    assert all(not env.verify(task, w).passed for w in env.perturb(task, "Quoran", None))
    script = iter([{"tool_calls": [{"id": "1", "function": {"name": "search", "arguments": '{"query": "Ilse Varn"}'}}]},
                   {"content": "Answer: Quoran"}])  # fmt: skip
    result = run_episode(env, task, lambda m, t: next(script))
    assert result.score.passed and "ilse_varn.txt" in result.trace[0].result
    assert normalize_answer("The  Sell-River!") == "sellriver"


def test_cli_runs_and_reports_bad_input_in_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dsv.synth.cli import synth_app

    runner = CliRunner()
    base = ["--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--out", str(tmp_path / "o")]
    r = runner.invoke(synth_app, ["search-qa", str(tmp_path / "missing"), *base])
    assert r.exit_code == 1 and "is not a directory" in r.output and len(r.output.strip().splitlines()) == 1
    docs = _write_docs(tmp_path / "docs")
    with se.ScriptedEndpoint(agents) as endpoint:
        args = ["search-qa", str(docs), "--endpoint", endpoint.base_url, "--model", endpoint.model,
                "--out", str(tmp_path / "cli"), "-n", "2", "--fail-under", "0.9"]  # fmt: skip
        r = runner.invoke(synth_app, args)
    assert r.exit_code == 4 and "1 of 2 item(s) accepted, under --fail-under 0.9" in r.output
    assert "answers_disagree: 1" in r.output and len(read_tasks(tmp_path / "cli" / "tasks.jsonl")) == 1
    # an unreachable endpoint: the items are endpoint errors (exit 3), kept for a re-run
    r = runner.invoke(synth_app, ["search-qa", str(docs), *base[:-2], "--out", str(tmp_path / "dead"), "-n", "1"])
    assert r.exit_code == 3 and "re-run the same command" in r.output and "Traceback" not in r.output


def test_dsv_eval_scores_the_kept_items_and_existing_questions_are_not_kept_again(built, tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from dsv.synth.eval.cli import eval_command

    app = typer.Typer()
    app.command()(eval_command)
    with se.ScriptedEndpoint(agents) as endpoint:  # the solver script answers the kept question
        args = ["--endpoint", endpoint.base_url, "--model", endpoint.model, "--tasks", str(built["out"] / "tasks.jsonl"),
                "--no-thinking", "--out", str(tmp_path / "eval"), "--fail-under", "1.0"]  # fmt: skip
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
        config = SearchQaConfig(out_dir=tmp_path / "again", corpus_dir=built["root"] / "docs", n=1,
                                existing=(built["out"] / "tasks.jsonl",))  # fmt: skip
        client = EndpointClient(endpoint.base_url, endpoint.model, max_retries=0)
        report = build_search_qa(client, config)
        client.close()
    assert report["items"][0]["category"] == "duplicate"


def _forget_indexes() -> None:
    """Drop the indexes this process built, so a task's corpus is read again from where it says."""
    searchqa_env._EMBEDDED.clear()
    searchqa_env._index_for.cache_clear()


def test_moving_the_output_folder_keeps_the_tasks_working(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from dsv.synth.eval.cli import eval_command

    docs = _write_docs(tmp_path / "docs")
    with se.ScriptedEndpoint(agents) as endpoint:
        client = EndpointClient(endpoint.base_url, endpoint.model, max_retries=0)
        build_search_qa(client, SearchQaConfig(out_dir=tmp_path / "first", corpus_dir=docs, n=1))
        build_search_qa(
            client, SearchQaConfig(out_dir=tmp_path / "bypath", corpus_dir=docs, n=1, embed_corpus_mb=0.0)
        )
        client.close()
        moved = tmp_path / "elsewhere" / "moved"
        moved.parent.mkdir()
        shutil.move(tmp_path / "first", moved)
        shutil.rmtree(docs)  # neither the collection nor the old folder exists any more
        _forget_indexes()
        (task,) = read_tasks(moved / "tasks.jsonl")
        assert task.state["corpus"]["path"] == "corpus.jsonl" and "data" in task.state["corpus"]
        env = registry.get(task.family)
        search = env.tools(task)[0]
        assert "ilse_varn.txt" in search("Ilse Varn") and env.verify(task, env.solve(task)).passed
        _forget_indexes()
        app = typer.Typer()
        app.command()(eval_command)
        args = ["--endpoint", endpoint.base_url, "--model", endpoint.model, "--tasks", str(moved / "tasks.jsonl"),
                "--no-thinking", "--out", str(tmp_path / "eval"), "--fail-under", "1.0"]  # fmt: skip
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, r.output
    assert "embedded in every task" in (moved / "report.md").read_text()
    assert "data" not in json.loads((moved / "report.json").read_text())["corpus"]
    # A corpus over --embed-corpus-mb is named by path: moving it away is a clear error, not a crash.
    (by_path,) = read_tasks(tmp_path / "bypath" / "tasks.jsonl")
    assert "data" not in by_path.state["corpus"] and Path(by_path.state["corpus"]["path"]).is_absolute()
    shutil.move(tmp_path / "bypath", tmp_path / "elsewhere" / "bypath")
    _forget_indexes()
    with pytest.raises(ValueError, match=r"corpus file .* cannot be read"):
        registry.get("search_qa").tools(by_path)
    # An embedded corpus edited after the fact no longer matches its sha256.
    tampered = json.loads(json.dumps(task.state))
    tampered["corpus"]["data"] = searchqa_env.embed_corpus(load_documents(_write_docs(tmp_path / "other"))[:3])
    _forget_indexes()
    with pytest.raises(ValueError, match="embedded in the task changed since the tasks were made"):
        registry.get("search_qa").tools(type(task)(**{**task.__dict__, "state": tampered}))


def test_synth_list_names_the_task_file_families_and_the_commands_that_make_them() -> None:
    from typer.testing import CliRunner

    from dsv.synth.cli import synth_app

    r = CliRunner().invoke(synth_app, ["list"], env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    tail = r.output[r.output.index("made into task files by a pipeline") :]
    assert "repo_issue (code; tools: list_files, read_file, search, write_file, run_tests)" in tail
    assert "dsv synth repo-envs REPO --issues issues.json --endpoint URL --model M" in tail
    assert "search_qa (search; tools: search, read)" in tail and "dsv synth search-qa DOCS_FOLDER" in tail
    payload = json.loads(CliRunner().invoke(synth_app, ["list", "--json"]).output)
    made = {row["family"]: row for row in payload["task_file_families"]}
    assert set(made) == {"repo_issue", "search_qa"} and made["search_qa"]["tools"] == ["search", "read"]
    assert made["repo_issue"]["made_by"].startswith("dsv synth repo-envs")
    assert not {"repo_issue", "search_qa"} & {row["family"] for row in payload["families"]}
