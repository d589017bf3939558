"""`dsv eval` end to end against a real scripted OpenAI-compatible endpoint on 127.0.0.1.

The endpoint plays a model with a known record: for task seed ``s`` the first
``CORRECT[s]`` replies are right and the rest wrong, so accuracy and pass@k have
exact expected values. Also covered: thinking on/off on the wire, reasoning-token
sources, concurrency, tool calls through a sandboxed library environment, bad task
files, unknown families, wrong-typed answers, a raising verifier, endpoint errors,
and resuming after SIGKILL.

Run: pytest packages/synth/tests/test_synth_eval.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from dsv.synth import registry
from dsv.synth.eval.client import EndpointClient
from dsv.synth.eval.metrics import pass_at_k
from dsv.synth.eval.policies import EndpointPolicyFactory
from dsv.synth.eval.runner import EnvResolver, EvalConfig, family_entries, load_task_file, run_eval
from dsv.synth.pipeline.library import Library


def _load_scripted():
    path = Path(__file__).with_name("scripted_endpoint.py")
    spec = importlib.util.spec_from_file_location("dsv_synth_tests_scripted_endpoint", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


se = _load_scripted()

CORRECT = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 0}  # correct replies per task seed, out of 4 samples
SAMPLES = 4


class OracleModel:
    """Answers arithmetic tasks: right for the first CORRECT[seed] requests of a task, then wrong."""

    def __init__(
        self, *, reasoning_tokens: bool = True, delay_s: float = 0.0, banana_seed: int | None = None
    ):
        env = registry.get("arithmetic")
        self.tasks = {env.generate(s, 2).prompt: env.generate(s, 2) for s in range(20)}
        self.seen: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.reasoning_tokens = reasoning_tokens
        self.delay_s = delay_s
        self.banana_seed = banana_seed

    def __call__(self, body: dict) -> se.Reply:
        user = se.last_user_text(body)
        task = next(t for prompt, t in self.tasks.items() if user.startswith(prompt))
        with self.lock:
            self.seen[task.id] += 1
            nth = self.seen[task.id]
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay_s)
            value = int(task.state["answer"])
            right = nth <= CORRECT.get(task.seed, 1)
            answer = value if right else value + 1
            if task.seed == self.banana_seed:
                answer = "banana"
            return se.Reply(
                content=f"The value is computed.\nAnswer: {answer}",
                reasoning_content="let me evaluate the expression step by step carefully",  # 8 words
                completion_tokens=20 + task.seed,
                reasoning_tokens=9 if self.reasoning_tokens else None,
            )
        finally:
            with self.lock:
                self.in_flight -= 1


def _run(
    endpoint_url: str,
    out: Path,
    *,
    thinking: bool = True,
    concurrency: int = 4,
    n: int = 6,
    samples: int = SAMPLES,
):
    client = EndpointClient(endpoint_url, "scripted", max_retries=0)
    try:
        factory = EndpointPolicyFactory(client, thinking=thinking)
        resolver = EnvResolver()
        entries = family_entries(resolver, "arithmetic", n, difficulty=2)
        config = EvalConfig(out_dir=out, samples=samples, thinking=thinking, concurrency=concurrency)
        return run_eval(entries, factory, config, resolver)
    finally:
        client.close()


def test_accuracy_and_pass_at_k_are_exact(tmp_path: Path) -> None:
    oracle = OracleModel()
    with se.ScriptedEndpoint(oracle) as endpoint:
        report = _run(endpoint.base_url, tmp_path)
    m = report["results"]["thinking"]["overall"]
    assert m["episodes"] == 24 and m["tasks"] == 6
    assert m["accuracy"] == pytest.approx(sum(CORRECT.values()) / 24)
    for k in (1, 2, 4):
        want = sum(pass_at_k(SAMPLES, c, k) for c in CORRECT.values()) / 6
        assert m[f"pass@{k}"] == pytest.approx(want)
    assert m["output_tokens_mean"] == pytest.approx(20 + 2.5)
    assert m["output_tokens_p90"] == pytest.approx(25)
    assert m["reasoning_tokens_mean"] == 9 and m["reasoning_tokens_source"] == ["usage"]
    assert m["tool_calls_per_episode"] == 0
    assert all(r.startswith("wrong value") for r in m["failure_reasons"])
    assert (tmp_path / "report.md").read_text().count("| arithmetic |") == 1
    assert (tmp_path / "accuracy_vs_tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "report.json").read_text())["meta"]["episodes_reported"] == 24


def test_thinking_flag_and_approximate_reasoning_count(tmp_path: Path) -> None:
    oracle = OracleModel(reasoning_tokens=False)
    with se.ScriptedEndpoint(oracle) as endpoint:
        _run(endpoint.base_url, tmp_path, thinking=True, n=2, samples=1)
        report = _run(endpoint.base_url, tmp_path, thinking=False, n=2, samples=1)
        bodies = endpoint.requests
    assert [b["thinking"]["type"] for b in bodies] == ["enabled"] * 2 + ["disabled"] * 2
    # both modes land in one report when run into the same directory
    assert set(report["results"]) == {"thinking", "no-thinking"}
    m = report["results"]["no-thinking"]["overall"]
    text = "let me evaluate the expression step by step carefully"
    assert m["reasoning_tokens_mean"] == -(-len(text) // 4) and m["reasoning_tokens_source"] == ["approx"]


def test_concurrency_overlaps_requests(tmp_path: Path) -> None:
    oracle = OracleModel()
    two_at_once = threading.Event()

    def held(body: dict) -> se.Reply:
        # Each request waits (up to 10 s) until another one is in flight beside it: a client that
        # sends one at a time fails the check below, whatever the host's speed.
        with oracle.lock:
            oracle.in_flight += 1
            if oracle.in_flight >= 2:
                two_at_once.set()
        try:
            two_at_once.wait(10)
        finally:
            with oracle.lock:
                oracle.in_flight -= 1
        return oracle(body)

    with se.ScriptedEndpoint(held) as endpoint:
        report = _run(endpoint.base_url, tmp_path, concurrency=8, n=4, samples=4)
    assert report["meta"]["concurrency"] == 8
    assert two_at_once.is_set()
    assert report["results"]["thinking"]["overall"]["episodes"] == 16


def test_bad_inputs_are_scored_failures(tmp_path: Path) -> None:
    env = registry.get("arithmetic")
    good = env.generate(1, 2)
    banana = env.generate(2, 2)
    unknown = {**good.to_json(), "id": "ghost-1", "family": "no_such_family"}
    lines = [
        json.dumps(good.to_json()),
        "{not json",
        json.dumps({"id": "x", "family": "arithmetic"}),
        json.dumps(unknown),
        json.dumps(banana.to_json()),
    ]
    task_file = tmp_path / "tasks.jsonl"
    task_file.write_text("\n".join(lines) + "\n")
    oracle = OracleModel(banana_seed=2)
    with se.ScriptedEndpoint(oracle) as endpoint:
        client = EndpointClient(endpoint.base_url, "scripted", max_retries=0)
        report = run_eval(
            load_task_file(task_file),
            EndpointPolicyFactory(client, thinking=True),
            EvalConfig(out_dir=tmp_path / "out", samples=1),
            EnvResolver(),
        )
        client.close()
    records = {
        r["task_id"]: r
        for r in map(json.loads, (tmp_path / "out" / "results.jsonl").read_text().splitlines())
    }
    assert records[good.id]["passed"]
    assert records[f"{task_file}:2"]["reason"].startswith(
        f"malformed task record at {task_file}:2: invalid JSON"
    )
    assert "missing field" in records[f"{task_file}:3"]["reason"]
    assert "unknown family 'no_such_family'" in records["ghost-1"]["reason"]
    assert "not an exact number" in records[banana.id]["reason"]
    assert report["results"]["thinking"]["overall"]["episodes"] == 5
    assert report["results"]["thinking"]["overall"]["accuracy"] == pytest.approx(0.2)


RAISING_VERIFIER = '''
from dsv.synth.env import Environment, Score, Task


class ProposedEnv(Environment):
    name = "fragile_echo"
    domain = "text"
    description = "Echo a word; the verifier crashes on answers that are not strings."

    def generate(self, seed: int, difficulty: int = 2) -> Task:
        word = ["alpha", "beta", "gamma"][seed % 3]
        return self._task(seed, difficulty, f"Say the word {word} after looking it up with lookup().",
                          {"word": word}, "Reply <answer>WORD</answer>.")

    def tools(self, task: Task) -> list:
        def lookup() -> str:
            """Return the word to say."""
            return task.state["word"]
        return [lookup]

    def solve(self, task: Task):
        return task.state["word"]

    def verify(self, task: Task, answer, trace=None) -> Score:
        return Score.ok() if answer.lower() == task.state["word"] else Score.fail("wrong word")
'''


def test_library_env_with_tools_and_a_raising_verifier(tmp_path: Path) -> None:
    library = Library(tmp_path / "lib")
    library.add("fragile_echo", RAISING_VERIFIER, {"domain": "text", "description": "echo"})

    def script(body: dict) -> se.Reply:
        messages = body["messages"]
        if messages[-1]["role"] == "user":
            return se.Reply(content="", tool_calls=[{"name": "lookup", "arguments": {}}])
        word = messages[-1]["content"]
        # seed 1 answers with a number: the verifier calls .lower() on it and raises
        return se.Reply(content="<answer>7</answer>" if word == "beta" else f"<answer>{word}</answer>")

    with se.ScriptedEndpoint(script) as endpoint:
        client = EndpointClient(endpoint.base_url, "scripted", max_retries=0)
        resolver = EnvResolver(library.root)
        report = run_eval(
            family_entries(resolver, "fragile_echo", 2),
            EndpointPolicyFactory(client, thinking=False),
            EvalConfig(out_dir=tmp_path / "out", samples=1, thinking=False, concurrency=2),
            resolver,
        )
        client.close()
        assert endpoint.requests[0]["tools"][0]["function"]["name"] == "lookup"
    m = report["results"]["no-thinking"]["overall"]
    assert m["accuracy"] == 0.5 and m["tool_calls_per_episode"] == 1.0
    (reason,) = [r for r in m["failure_reasons"]]
    assert "verifier raised AttributeError" in reason


def test_endpoint_errors_are_retried_not_scored(tmp_path: Path) -> None:
    state = {"fail": True}
    oracle = OracleModel()

    def script(body: dict) -> se.Reply:
        if state["fail"]:
            return se.Reply(content="down for maintenance", status=503)
        return oracle(body)

    with se.ScriptedEndpoint(script) as endpoint:
        first = _run(endpoint.base_url, tmp_path, n=2, samples=1)
        assert first["results"]["thinking"]["overall"]["errors"] == 2
        state["fail"] = False
        second = _run(endpoint.base_url, tmp_path, n=2, samples=1)
    m = second["results"]["thinking"]["overall"]
    assert m["errors"] == 0 and m["episodes"] == 2 and m["accuracy"] == 0.5


def _eval_cmd(url: str, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "dsv.synth.eval",
        "--base-url",
        url,
        "--model",
        "scripted",
        "--family",
        "arithmetic",
        "--n",
        "12",
        "--concurrency",
        "2",
        "--out",
        str(out),
        *extra,
    ]


class _Gated:
    """``script`` for the first ``answered`` requests; later ones wait (counted in ``held``) until
    ``release`` is set. Lets a test kill the client at a known point however slow the host is."""

    def __init__(self, script: Callable[[dict], se.Reply], answered: int) -> None:
        self.script, self.answered = script, answered
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.arrived = 0
        self.held = 0

    def __call__(self, body: dict) -> se.Reply:
        with self.lock:
            self.arrived += 1
            gated = self.arrived > self.answered
            self.held += gated
        if gated:
            self.release.wait(120)
        return self.script(body)


def test_sigkill_midway_then_resume_counts_each_task_once(tmp_path: Path) -> None:
    oracle = OracleModel()
    gate = _Gated(oracle, answered=4)
    results = tmp_path / "results.jsonl"
    with se.ScriptedEndpoint(gate) as endpoint:
        proc = subprocess.Popen(
            _eval_cmd(endpoint.base_url, tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        # Killed with four episodes written and its two concurrent requests (--concurrency 2) waiting
        # at the server: nothing the killed client sent is still on its way when the log is read.
        deadline = time.monotonic() + 120
        while not (results.exists() and len(results.read_bytes().splitlines()) >= 4 and gate.held >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not reach the gate"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done = len([line for line in results.read_text().splitlines() if line.strip()])
        assert done == 4, "the kill lands midway"
        asked_before = len(endpoint.requests)
        gate.answered = 10**6
        gate.release.set()
        rerun = subprocess.run(
            _eval_cmd(endpoint.base_url, tmp_path), capture_output=True, text=True, timeout=120
        )
        assert rerun.returncode == 0, rerun.stderr
        asked_after = len(endpoint.requests)
    assert asked_after - asked_before == 12 - done  # finished episodes were not asked again
    report = json.loads((tmp_path / "report.json").read_text())
    m = report["results"]["thinking"]["overall"]
    assert m["episodes"] == 12 and m["tasks"] == 12
    keys = [json.loads(line)["key"] for line in results.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 12
    assert "accuracy" in rerun.stdout


def test_cli_user_errors_are_one_line(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dsv.synth.eval", *args], capture_output=True, text=True)

    unknown = run(
        "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--family", "arithmetc", "--out", str(tmp_path)
    )
    assert unknown.returncode == 1
    assert unknown.stderr.strip().startswith("error: unknown family 'arithmetc'; did you mean arithmetic")
    assert len(unknown.stderr.strip().splitlines()) == 1
    both = run("--base-url", "http://x/v1", "--model", "m", "--family", "arithmetic", "--tasks", "t.jsonl")
    assert both.returncode == 2 and both.stderr.strip().startswith("error: pass exactly one")
    missing = run("--base-url", "http://x/v1", "--model", "m", "--tasks", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 1 and missing.stderr.strip().startswith("error: cannot read --tasks")
    no_ckpt = run("--model", str(tmp_path / "no-such-ckpt"), "--family", "arithmetic")
    assert no_ckpt.returncode == 1 and "not a checkpoint directory" in no_ckpt.stderr


@pytest.mark.slow
def test_in_process_checkpoint_eval(tmp_path: Path) -> None:
    pytest.importorskip("dsv.core.generate", reason="in-process eval needs dsv-core")
    import torch

    from dsv.core.checkpoint import save_pretrained
    from dsv.core.model import DSVForCausalLM
    from dsv.core.presets import tiny
    from dsv.core.tokenizer import default_corpus, train_bpe

    cfg = tiny()
    torch.manual_seed(0)
    save_pretrained(DSVForCausalLM(cfg), train_bpe(default_corpus(400), cfg.vocab_size), tmp_path / "ckpt")
    out = tmp_path / "out"
    args = ["--model", str(tmp_path / "ckpt"), "--family", "arithmetic", "--n", "2", "--max-tokens", "6"]
    run = subprocess.run([sys.executable, "-m", "dsv.synth.eval", *args, "--out", str(out)], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        # a random model: every token it samples before `</think>` is reasoning, counted by the tokenizer
        assert 1 <= r["output_tokens"] <= 6 and 0 <= r["reasoning_tokens"] <= r["output_tokens"]
        assert r["reasoning_source"] in ("tokenizer", "none") and r["status"] == "done"
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["target"].startswith("checkpoint ")
    assert report["results"]["thinking"]["overall"]["episodes"] == 2


def test_cli_task_file_with_samples_and_no_thinking(tmp_path: Path) -> None:
    from dsv.synth.tasks import write_tasks

    env = registry.get("arithmetic")
    write_tasks(tmp_path / "tasks.jsonl", [env.generate(s, 2) for s in (1, 3)])
    oracle = OracleModel()
    with se.ScriptedEndpoint(oracle) as endpoint:
        args = [
            "--base-url",
            endpoint.base_url,
            "--model",
            "scripted",
            "--tasks",
            str(tmp_path / "tasks.jsonl"),
        ]
        run = subprocess.run(
            [sys.executable, "-m", "dsv.synth.eval", *args, "--samples", "4", "--no-thinking", "--out", str(tmp_path / "o")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert {b["thinking"]["type"] for b in endpoint.requests} == {"disabled"}
    assert run.returncode == 0, run.stderr
    m = json.loads((tmp_path / "o" / "report.json").read_text())["results"]["no-thinking"]["overall"]
    assert m["accuracy"] == pytest.approx((CORRECT[1] + CORRECT[3]) / 8)
    assert m["pass@4"] == 1.0 and m["pass@1"] == pytest.approx((1 / 4 + 3 / 4) / 2)
    md = (tmp_path / "o" / "report.md").read_text()
    assert "## no-thinking" in md and "| pass@1 | pass@2 | pass@4 |" in md


def test_public_api_is_pinned() -> None:
    import dsv.synth.eval as ev
    import dsv.synth.pipeline as pl

    assert sorted(ev.__all__) == [
        "ChatReply", "EndpointClient", "EndpointError", "EndpointPolicyFactory", "EnvResolver", "EpisodePolicy",
        "EvalConfig", "LocalModelPolicyFactory", "TaskEntry", "Usage", "family_entries", "load_task_file",
        "pass_at_k", "percentile", "run_eval", "summarize", "summarize_groups", "write_report",
    ]  # fmt: skip
    assert sorted(pl.__all__) == [
        "BuildConfig", "Fingerprint", "HarnessError", "Library", "LibraryError", "PROPOSAL_INSTRUCTIONS",
        "ProposalFormatError", "ProposalOutcome", "SandboxedEnvironment", "build", "check_proposal",
        "extract_code", "find_duplicate", "jaccard", "run_harness", "static_check",
    ]  # fmt: skip
    for module in (ev, pl):
        for name in module.__all__:
            assert getattr(module, name) is not None


class RouteModel:
    """Plays shortest_path with reasoning and a tool call, then answers (right for even seeds)."""

    def __init__(self, n: int) -> None:
        env = registry.get("shortest_path")
        self.env = env
        self.tasks = [env.generate(s, 2) for s in range(n)]

    def __call__(self, body: dict) -> se.Reply:
        user = se.last_user_text(body)
        task = next(t for t in self.tasks if user.startswith(t.prompt))
        if not any(m.get("role") == "tool" for m in body["messages"]):
            return se.Reply(
                content="",
                reasoning_content=f"I should look around {task.state['source']} first — ünïcode ok.",
                tool_calls=[
                    {"name": "neighbours", "arguments": {"station": task.state["source"]}},
                    {"name": "neighbours", "arguments": {"station": task.state["target"]}},
                ],
                reasoning_tokens=None if task.seed % 3 == 0 else 11,
            )
        route = self.env.solve(task)
        if task.seed % 2:
            route = route[:1] + route[-1:]  # skips the middle: no such road, or not optimal
        return se.Reply(
            content=f"The route is below.\nAnswer: {json.dumps(route)}",
            reasoning_content="the tool results give the costs; Dijkstra by hand",
            completion_tokens=30 + task.seed,
        )


def _strip_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if "time" not in k and k not in ("wall_s", "finished", "started")}


def test_streamed_and_plain_evals_give_the_same_report(tmp_path: Path) -> None:
    model = RouteModel(n=4)
    reports = {}
    with se.ScriptedEndpoint(model) as endpoint:
        for stream in (False, True):
            client = EndpointClient(endpoint.base_url, "scripted", max_retries=0)
            try:
                factory = EndpointPolicyFactory(client, thinking=True, stream=stream)
                resolver = EnvResolver()
                entries = family_entries(resolver, "shortest_path", 4, difficulty=2)
                config = EvalConfig(out_dir=tmp_path / str(stream), samples=2, thinking=True, concurrency=2)
                reports[stream] = run_eval(entries, factory, config, resolver)
            finally:
                client.close()
        bodies = endpoint.requests
    assert [bool(b.get("stream")) for b in bodies] == [False] * 16 + [True] * 16
    assert all(b["stream_options"] == {"include_usage": True} for b in bodies[16:])
    # Streamed assistant turns went back to the server exactly as the plain ones did.
    second_turns = [b["messages"] for b in bodies if len(b["messages"]) > 1]
    plain = sorted(json.dumps(_no_ids(m), sort_keys=True) for m in second_turns[:8])
    streamed = sorted(json.dumps(_no_ids(m), sort_keys=True) for m in second_turns[8:])
    assert plain == streamed
    m = reports[True]["results"]["thinking"]["overall"]
    assert m["accuracy"] == 0.5 and m["tool_calls_per_episode"] == 2.0
    # answers carry no server reasoning count (approx); the tool turn has one except for seeds 0 and 3
    assert m["reasoning_tokens_source"] == ["approx", "approx+usage"], m["reasoning_tokens_source"]
    assert reports[True]["results"] == reports[False]["results"]
    lines = {}
    for stream in (False, True):
        records = [json.loads(x) for x in (tmp_path / str(stream) / "results.jsonl").read_text().splitlines()]
        lines[stream] = sorted(
            (_strip_timing(r) for r in records), key=lambda r: json.dumps(r, sort_keys=True)
        )
    assert lines[True] == lines[False]


def _no_ids(messages: list[dict]) -> list[dict]:
    """Messages without the per-reply random tool-call ids (the server makes fresh ones every time)."""
    out = []
    for m in messages:
        m = dict(m)
        m.pop("tool_call_id", None)
        if "tool_calls" in m:
            m["tool_calls"] = [{**c, "id": "-"} for c in m["tool_calls"]]
        out.append(m)
    return out


def test_streamed_reply_accumulates_to_the_plain_one() -> None:
    model = RouteModel(n=2)
    with se.ScriptedEndpoint(model) as endpoint:
        client = EndpointClient(endpoint.base_url, "scripted", max_retries=0)
        try:
            messages = [{"role": "user", "content": model.tasks[1].prompt}]
            plain = client.chat(messages, thinking=True)
            streamed = client.chat(messages, thinking=True, stream=True)
        finally:
            client.close()
    assert len(streamed.message["tool_calls"]) == 2 and "ünïcode" in streamed.message["reasoning_content"]
    assert _no_ids([streamed.message]) == _no_ids([plain.message])
    assert streamed.usage == plain.usage and streamed.usage.reasoning_tokens == 11
    assert streamed.finish_reason == plain.finish_reason == "tool_calls"


def test_stream_without_an_endpoint_is_a_usage_error(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from dsv.synth.eval.cli import eval_command

    app = typer.Typer()
    app.command()(eval_command)
    args = ["--model", str(tmp_path), "--family", "arithmetic", "--stream", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, args)
    assert (
        result.exit_code == 2 and result.output.strip().startswith("error:") and "--endpoint" in result.output
    )
