"""Running proposal code in the sandbox: the worker program, and the judge that stays on the host.

The proposal's code only ever runs in the **worker**, a small self-contained program executed
by ``dsv.synth.sandbox.run_python`` next to ``proposal.py`` (the untrusted module) and copies of
this package's ``dsv/synth/env.py`` and ``dsv/synth/tools.py`` (with an empty
``dsv/synth/__init__.py``), so ``from dsv.synth.env import Environment`` works inside the
sandbox with nothing but the standard library.

The worker answers a batch of primitive calls (JSON on stdin): ``meta``, ``generate``,
``tools``, ``solve``, ``perturb``, ``parse_answer``, ``verify`` and ``call_tool``. It replies
with one line ``<marker><json>`` holding the raw return value of each call. It decides nothing.
While proposal code runs, ``sys.stdout`` points at stderr, so huge outputs still hit the
sandbox's output cap.

The **judge** (``check_source``, used by ``dsv synth build``) runs in this, the host, process
and never imports the proposal. It drives four worker runs, each a fresh sandboxed process:

1. ``meta`` and every task (``generate``);
2. every task again, to check determinism across processes, plus tool schemas and ``solve``;
3. ``perturb`` of the reference and ``parse_answer`` of its text form;
4. ``verify`` of the reference, of the parsed reference, of every perturbation and of junk answers.

The judge validates the raw data (task shape, JSON round-trip, size, schema shape) and
decides acceptance. The proposal cannot forge a verdict, because no verdict is ever
computed where its code runs. Whatever it prints or patches, the judge sees only the
values its methods return. Its data has to pass the same checks as honest data.

Limits: a proposal can still tell a check batch from a single call made later through the
adapter (``dsv.synth.pipeline.library``), so code written to behave well only while being
checked is not caught. The checks find broken and over-lenient environments, and the
sandbox bounds what any code can do.

Sandboxed adapter calls (``run_harness(source, {"mode": ..., ...})``) are batches of one call.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv.synth.env import Task, TaskFormatError
from dsv.synth.sandbox import Limits, SandboxResult, run_python

__all__ = ["HarnessError", "HarnessReply", "check_source", "default_limits", "run_harness", "run_worker"]

_MARKER = "@@dsv-harness-result:"

WORKER_SOURCE = r"""
import json, random, sys

_REAL_STDOUT = sys.stdout
sys.stdout = sys.stderr  # proposal prints go to stderr

MARKER = sys.argv[1]


def _reply(obj):
    text = MARKER + json.dumps(obj, ensure_ascii=True, default=repr) + "\n"
    _REAL_STDOUT.write(text)
    _REAL_STDOUT.flush()


def _err(exc):
    return f"{type(exc).__name__}: {exc}"[:800]


def _load():
    import importlib.util
    from dsv.synth.env import Environment

    spec = importlib.util.spec_from_file_location("proposal", "proposal.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["proposal"] = module
    spec.loader.exec_module(module)
    cls = getattr(module, "ProposedEnv", None)
    if not (isinstance(cls, type) and issubclass(cls, Environment)):
        raise TypeError("ProposedEnv is missing or is not a subclass of Environment")
    return cls


def _replay(env, task, calls):
    from dsv.synth.tools import call_tool

    fns = env.tools(task)
    for name, arguments in calls:
        call_tool(fns, name, arguments)
    return fns


def _one(cls, req):
    from dsv.synth.env import AnswerFormatError, Task, ToolCallRecord, safe_verify
    from dsv.synth.tools import call_tool, tool_schema

    mode = req["mode"]
    if mode == "meta":
        return {"ok": True, "name": getattr(cls, "name", None), "domain": getattr(cls, "domain", None),
                "description": getattr(cls, "description", None)}
    env = cls()
    if mode == "parse_answer":
        try:
            return {"ok": True, "answer": env.parse_answer(req["text"])}
        except AnswerFormatError as exc:
            return {"ok": False, "category": "answer_format", "reason": str(exc)}
    if mode == "generate":
        task = env.generate(req["seed"], req["difficulty"])
        if not isinstance(task, Task):
            return {"ok": False, "category": "interface", "reason": f"generate returned {type(task).__name__}, not Task"}
        return {"ok": True, "task": task.to_json()}
    task = Task.from_json(req["task"])
    if mode == "tools":
        return {"ok": True, "schemas": [tool_schema(fn) for fn in env.tools(task)]}
    if mode == "solve":
        answer = env.solve(task)
        try:
            json.dumps(answer)
        except (TypeError, ValueError):
            return {"ok": False, "category": "interface", "reason": f"reference answer {answer!r:.80} is not JSON-serialisable"}
        return {"ok": True, "answer": answer}
    if mode == "perturb":
        return {"ok": True, "answers": list(env.perturb(task, req["answer"], random.Random(req["seed"])))}
    if mode == "call_tool":
        fns = _replay(env, task, req["history"])
        return {"ok": True, "result": call_tool(fns, req["name"], req["arguments"])}
    if mode == "verify":
        trace = [ToolCallRecord(t["name"], t["arguments"], t["result"]) for t in req["trace"]]
        _replay(env, task, [(t.name, t.arguments) for t in trace])
        s = safe_verify(env, task, req["answer"], trace)
        return {"ok": True, "score": {"reward": s.reward, "passed": s.passed, "reason": s.reason}}
    return {"ok": False, "category": "harness", "reason": f"unknown mode {mode!r}"}


def _main():
    reqs = json.loads(sys.stdin.read())
    try:
        cls = _load()
    except SyntaxError as exc:
        return {"load_error": {"category": "syntax_error", "reason": f"syntax error at line {exc.lineno}: {exc.msg}"}}
    except Exception as exc:
        return {"load_error": {"category": "crash", "reason": f"import failed: {_err(exc)}"}}
    out = []
    for req in reqs:
        try:
            out.append(_one(cls, req))
        except Exception as exc:
            out.append({"ok": False, "category": "crash", "reason": f"{req.get('mode')} raised {_err(exc)}"})
    return {"results": out}


_reply(_main())
"""


class HarnessError(RuntimeError):
    """The harness could not produce an answer (timeout, memory, output cap, crash)."""

    def __init__(self, category: str, message: str) -> None:
        super().__init__(message)
        self.category = category


@dataclass(frozen=True)
class HarnessReply:
    """The harness's JSON answer and the sandbox run that produced it."""

    data: dict[str, Any]
    sandbox: SandboxResult


def default_limits(wall_s: float = 20.0) -> Limits:
    """Limits for one harness run: the check mode runs several seeds, so it gets a few seconds of CPU."""
    return Limits(cpu_s=wall_s / 2, wall_s=wall_s, memory_mb=512, output_bytes=1_000_000)


def _runtime_files() -> dict[str, str]:
    import dsv.synth.env as env_module
    import dsv.synth.tools as tools_module

    return {
        "dsv/synth/__init__.py": '"""dsv.synth runtime for sandboxed proposals (env + tools only)."""\n',
        "dsv/synth/env.py": Path(env_module.__file__).read_text(encoding="utf-8"),
        "dsv/synth/tools.py": Path(tools_module.__file__).read_text(encoding="utf-8"),
    }


_STATUS_CATEGORY = {
    "timeout": "timeout",
    "memory": "memory",
    "output_limit": "output_limit",
    "killed": "crash",
    "error": "crash",
}


def _failure(result: SandboxResult, limits: Limits) -> HarnessError:
    category = _STATUS_CATEGORY.get(result.status, "crash")
    if result.status == "ok":
        category = "crash"
    tail = result.stderr.strip().splitlines()[-1:] if result.stderr.strip() else []
    detail = f": {tail[0][:300]}" if tail else ""
    if category == "timeout":
        # Name the limit that stopped the run: the CPU one (half the wall one) usually ends a busy
        # loop first, and "3.0s wall" next to --sandbox-wall 5 reads like the flag was ignored.
        cpu_limit = max(1, math.ceil(limits.cpu_s))  # the sandbox's RLIMIT_CPU is whole seconds
        which = (
            f"CPU limit {cpu_limit}s (half of --sandbox-wall {limits.wall_s:g}s, rounded up)"
            if result.cpu_s >= limits.cpu_s * 0.95
            else f"wall limit {limits.wall_s:g}s (--sandbox-wall)"
        )
        msg = f"sandbox timeout: {which} reached after {result.wall_s:.1f}s wall / {result.cpu_s:.1f}s CPU"
    elif category == "output_limit":
        msg = "sandbox output limit exceeded"
    elif category == "memory":
        msg = "sandbox memory limit exceeded"
    else:
        msg = f"sandbox run failed (status {result.status}, exit {result.returncode}){detail}"
    if "Network is unreachable" in result.stderr or "Errno 101" in result.stderr:
        category, msg = "network", f"network access attempted (blocked by the sandbox){detail}"
    return HarnessError(category, msg)


def run_worker(
    source: str, requests: list[dict[str, Any]], *, limits: Limits | None = None
) -> tuple[list[dict[str, Any]], SandboxResult]:
    """One sandboxed worker run answering ``requests``; the raw (untrusted) results, in order.

    ``HarnessError`` when no well-formed answer came back or the module did not load.
    """
    limits = limits or default_limits()
    marker = _MARKER + secrets.token_hex(8) + ":"
    files = {**_runtime_files(), "proposal.py": source}
    result = run_python(
        WORKER_SOURCE,
        files=files,
        stdin=json.dumps(requests),
        args=[marker],
        limits=limits,
    )
    answer: Any = None
    for line in reversed(result.stdout.splitlines()):
        if line.startswith(marker):
            try:
                answer = json.loads(line[len(marker) :])
            except (json.JSONDecodeError, RecursionError):
                answer = None
            break
    if result.status != "ok" or not isinstance(answer, dict):
        raise _failure(result, limits)
    load_error = answer.get("load_error")
    if isinstance(load_error, dict):
        raise HarnessError(str(load_error.get("category", "crash")), str(load_error.get("reason", "")))
    results = answer.get("results")
    if not isinstance(results, list) or len(results) != len(requests):
        raise HarnessError("crash", "the worker's reply is malformed")
    return [r if isinstance(r, dict) else {"ok": False, "category": "crash"} for r in results], result


def run_harness(source: str, request: dict[str, Any], *, limits: Limits | None = None) -> HarnessReply:
    """One call (``request["mode"]``) in the sandbox, or the acceptance checks for ``mode == "check"``.

    ``HarnessError`` if no answer came back. A load failure in a single call comes back as
    ``{"ok": False, "category": ..., "reason": ...}``.
    """
    if request.get("mode") == "check":
        return check_source(source, request, limits=limits)
    try:
        results, sandbox = run_worker(source, [request], limits=limits)
    except HarnessError as exc:
        if exc.category in ("syntax_error", "crash") and "sandbox" not in str(exc):
            return HarnessReply({"ok": False, "category": exc.category, "reason": str(exc)}, _NO_RUN)
        raise
    return HarnessReply(results[0], sandbox)


_NO_RUN = SandboxResult("error", None, "", "", 0.0, 0.0, False)
_NAME_RE = re.compile(r"[a-z][a-z0-9_]{1,47}")
_JUNK: list[Any] = [None, "", "I do not know", -987654321, [], {}]


class _Reject(Exception):
    def __init__(self, category: str, reason: str) -> None:
        super().__init__(reason)
        self.category = category


def _need(reply: dict[str, Any], where: str) -> dict[str, Any]:
    """The reply of a call that must succeed; a failed call rejects the proposal with its category."""
    if reply.get("ok") is True:
        return reply
    category = str(reply.get("category", "crash"))
    reason = str(reply.get("reason", "failed"))[:600]
    raise _Reject(category if category in ("interface", "crash") else "crash", f"{reason} ({where})")


def _valid_schema(schema: Any) -> bool:
    fn = schema.get("function") if isinstance(schema, dict) else None
    return (
        isinstance(fn, dict)
        and isinstance(fn.get("name"), str)
        and bool(fn["name"])
        and isinstance(fn.get("parameters", {}), dict)
    )


def _same(a: Any, b: Any) -> bool:
    """JSON values equal with equal types (so 1, 1.0 and True differ)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) and type(a) is type(b)


def _passed(reply: dict[str, Any], where: str) -> bool:
    score = _need(reply, where).get("score")
    if not isinstance(score, dict) or not isinstance(score.get("passed"), bool):
        raise _Reject("interface", f"verify did not return a Score ({where})")
    reward = score.get("reward")
    if not isinstance(reward, (int, float)) or isinstance(reward, bool) or not math.isfinite(reward):
        raise _Reject("interface", f"verify returned a non-numeric reward ({where})")
    return score["passed"]


def check_source(source: str, request: dict[str, Any], *, limits: Limits | None = None) -> HarnessReply:
    """The acceptance checks of ``dsv synth build``, judged here from four sandboxed worker runs.

    ``request`` holds ``seeds``, ``difficulties``, ``max_task_chars`` and ``n_prompts``. The reply's
    data is ``{"ok": False, "category", "reason"}`` or ``{"ok": True, "name", "prompts", ...}``.
    ``HarnessError`` when a worker run itself failed (timeout, memory, output cap, crash).
    """
    try:
        data, sandbox = _judge(source, request, limits)
    except _Reject as exc:
        return HarnessReply({"ok": False, "category": exc.category, "reason": str(exc)}, _NO_RUN)
    except HarnessError as exc:
        if exc.category == "syntax_error" or (exc.category == "crash" and "import failed" in str(exc)):
            return HarnessReply({"ok": False, "category": exc.category, "reason": str(exc)}, _NO_RUN)
        raise
    return HarnessReply(data, sandbox)


def _judge(source: str, req: dict[str, Any], limits: Limits | None) -> tuple[dict[str, Any], SandboxResult]:
    keys = [(int(d), int(s)) for d in req["difficulties"] for s in req["seeds"]]
    where = {k: f"seed={k[1]} difficulty={k[0]}" for k in keys}
    gen = [{"mode": "generate", "seed": s, "difficulty": d} for d, s in keys]

    # 1. meta + tasks
    first, _ = run_worker(source, [{"mode": "meta"}, *gen], limits=limits)
    meta = _need(first[0], "class attributes")
    name = meta.get("name")
    if not (isinstance(name, str) and _NAME_RE.fullmatch(name)):
        raise _Reject("interface", f"name must be lowercase snake_case, got {name!r}")
    for attr in ("domain", "description"):
        if not isinstance(meta.get(attr), str):
            raise _Reject("interface", f"class attribute {attr!r} must be a string")
    tasks: dict[tuple[int, int], dict[str, Any]] = {}
    texts: dict[tuple[int, int], str] = {}
    for k, reply in zip(keys, first[1:], strict=True):
        task = _need(reply, f"generate, {where[k]}").get("task")
        try:
            parsed = Task.from_json(task)
        except (TaskFormatError, TypeError, AttributeError) as exc:
            raise _Reject("interface", f"generate returned a malformed task ({where[k]}): {exc}") from None
        text = json.dumps(task, sort_keys=True)
        if len(text) > req["max_task_chars"]:
            raise _Reject(
                "too_large", f"task is {len(text)} characters ({where[k]}); limit {req['max_task_chars']}"
            )
        if json.dumps(parsed.to_json(), sort_keys=True) != text:
            raise _Reject("interface", f"task does not survive a JSON round-trip ({where[k]})")
        tasks[k], texts[k] = task, text

    # 2. determinism (a fresh process), tool schemas, reference answers
    second_reqs: list[dict[str, Any]] = []
    for k in keys:
        second_reqs += [
            gen[keys.index(k)],
            {"mode": "tools", "task": tasks[k]},
            {"mode": "solve", "task": tasks[k]},
        ]
    second, _ = run_worker(source, second_reqs, limits=limits)
    answers: dict[tuple[int, int], Any] = {}
    tool_names: set[str] = set()
    for i, k in enumerate(keys):
        again, tools, solved = second[3 * i : 3 * i + 3]
        if json.dumps(_need(again, f"generate (again), {where[k]}").get("task"), sort_keys=True) != texts[k]:
            raise _Reject("nondeterministic", f"generate is not deterministic ({where[k]})")
        schemas = _need(tools, f"tools, {where[k]}").get("schemas")
        if not isinstance(schemas, list) or not all(_valid_schema(sc) for sc in schemas):
            raise _Reject("interface", f"tool schemas are malformed ({where[k]})")
        tool_names.update(sc["function"]["name"] for sc in schemas)
        if "answer" not in _need(solved, f"solve, {where[k]}"):
            raise _Reject("interface", f"solve returned nothing ({where[k]})")
        answers[k] = solved["answer"]

    # 3. wrong answers from the proposal, and the reference's text round-trip
    third_reqs: list[dict[str, Any]] = []
    for d, s in keys:
        answer_json = json.dumps(answers[(d, s)])
        third_reqs += [
            {
                "mode": "perturb",
                "task": tasks[(d, s)],
                "answer": answers[(d, s)],
                "seed": f"dsv-check/{s}/{d}",
            },
            {"mode": "parse_answer", "text": f"<answer>{answer_json}</answer>"},
        ]
    third, _ = run_worker(source, third_reqs, limits=limits)
    wrongs: dict[tuple[int, int], list[Any]] = {}
    parsed_answers: dict[tuple[int, int], Any] = {}
    for i, k in enumerate(keys):
        wrong = _need(third[2 * i], f"perturb, {where[k]}").get("answers")
        if not isinstance(wrong, list):
            raise _Reject("interface", f"perturb did not return a list ({where[k]})")
        parsed_reply = third[2 * i + 1]
        if not parsed_reply.get("ok"):
            raise _Reject(
                "reference_rejected",
                f"reference answer fails after the text round-trip ({where[k]}): "
                f"{str(parsed_reply.get('reason', ''))[:300]}",
            )
        wrongs[k] = [w for w in wrong + _JUNK if not _same(w, answers[k])]
        parsed_answers[k] = parsed_reply.get("answer")

    # 4. every verdict, in one more fresh process
    fourth_reqs: list[dict[str, Any]] = []
    for k in keys:
        for answer in (answers[k], parsed_answers[k], *wrongs[k]):
            fourth_reqs.append({"mode": "verify", "task": tasks[k], "answer": answer, "trace": []})
    fourth, sandbox = run_worker(source, fourth_reqs, limits=limits)
    pos = 0
    n_wrong = 0
    for k in keys:
        if not _passed(fourth[pos], f"verify, {where[k]}"):
            reason = str((fourth[pos].get("score") or {}).get("reason", ""))
            raise _Reject(
                "reference_rejected", f"verifier rejects the reference answer ({where[k]}): {reason}"[:600]
            )
        if not _passed(fourth[pos + 1], f"verify, {where[k]}"):
            raise _Reject(
                "reference_rejected", f"reference answer fails after the text round-trip ({where[k]})"
            )
        for j, bad in enumerate(wrongs[k]):
            if _passed(fourth[pos + 2 + j], f"verify, {where[k]}"):
                raise _Reject("accepts_wrong", f"verifier accepts the wrong answer {bad!r:.80} ({where[k]})")
            n_wrong += 1
        pos += 2 + len(wrongs[k])
    prompts = [str(tasks[k]["prompt"]) for k in keys[: req["n_prompts"]]]
    return {
        "ok": True,
        "name": name,
        "domain": meta["domain"],
        "description": meta["description"],
        "prompts": prompts,
        "sample_task": tasks[keys[0]],
        "tools": sorted(tool_names),
        "answer_types": sorted({type(a).__name__ for a in answers.values()}),
        "tasks_checked": len(keys),
        "wrong_answers_checked": n_wrong,
    }, sandbox
