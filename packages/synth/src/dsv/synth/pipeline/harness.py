"""Running proposal code in the sandbox: the harness program and the host-side call.

The harness is a small self-contained program executed by ``dsv.synth.sandbox.run_python``
next to three files: ``proposal.py`` (the untrusted module) and copies of this
package's ``dsv/synth/env.py`` and ``dsv/synth/tools.py`` (with an empty
``dsv/synth/__init__.py``), so ``from dsv.synth.env import Environment`` works inside
the sandbox with nothing but the standard library — the sandbox may run a system
``python3`` under a fresh uid that cannot read the host's source tree.

The request arrives on stdin as JSON; the harness answers with one line
``<marker><json>`` on the real stdout after all proposal code has run. While
proposal code runs, ``sys.stdout`` points at stderr, so its prints cannot be taken for
the answer and huge outputs still hit the sandbox's output cap.

Modes: ``check`` (the acceptance checks of ``dsv synth build``), and for the
sandboxed adapter ``generate``, ``solve``, ``verify``, ``perturb``,
``parse_answer``, ``call_tool`` (stateful tools are handled by replaying the earlier
calls of the episode before the new one; ``verify`` replays the trace first for the
same reason).

Limits: the harness and the proposal share one interpreter, so deliberately
adversarial code could tamper with the harness; the checks defend against broken
and over-lenient environments, and the sandbox bounds what any code can do.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsv.synth.sandbox import Limits, SandboxResult, run_python

__all__ = ["HarnessError", "HarnessReply", "default_limits", "run_harness"]

_MARKER = "@@dsv-harness-result:"

HARNESS_SOURCE = r"""
import json, random, re, sys, traceback

_REAL_STDOUT = sys.stdout
sys.stdout = sys.stderr  # proposal prints go to stderr

MARKER = __MARKER__


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


def _check(cls, req):
    from dsv.synth.env import Environment, Task, safe_verify
    from dsv.synth.tools import tool_schema

    name = getattr(cls, "name", None)
    if not (isinstance(name, str) and re.fullmatch(r"[a-z][a-z0-9_]{1,47}", name)):
        return {"ok": False, "category": "interface", "reason": f"name must be lowercase snake_case, got {name!r}"}
    for attr in ("domain", "description"):
        if not isinstance(getattr(cls, attr, None), str):
            return {"ok": False, "category": "interface", "reason": f"class attribute {attr!r} must be a string"}
    env = cls()
    prompts, tool_names, answer_types = [], set(), set()
    sample = None
    n_tasks = n_wrong = 0
    junk = [None, "", "I do not know", -987654321, [], {}]
    for difficulty in req["difficulties"]:
        for seed in req["seeds"]:
            where = f"seed={seed} difficulty={difficulty}"
            stage = "generate"
            try:
                task = env.generate(seed, difficulty)
                if not isinstance(task, Task):
                    return {"ok": False, "category": "interface", "reason": f"generate returned {type(task).__name__}, not Task ({where})"}
                stage = "serialise task"
                text = json.dumps(task.to_json(), sort_keys=True)
                if len(text) > req["max_task_chars"]:
                    return {"ok": False, "category": "too_large", "reason": f"task is {len(text)} characters ({where}); limit {req['max_task_chars']}"}
                if Task.from_json(json.loads(text)).to_json() != json.loads(text):
                    return {"ok": False, "category": "interface", "reason": f"task does not survive a JSON round-trip ({where})"}
                stage = "generate (again)"
                if json.dumps(env.generate(seed, difficulty).to_json(), sort_keys=True) != text:
                    return {"ok": False, "category": "nondeterministic", "reason": f"generate is not deterministic ({where})"}
                stage = "tools"
                for fn in env.tools(task):
                    tool_names.add(tool_schema(fn)["function"]["name"])
                stage = "solve"
                answer = env.solve(task)
                try:
                    answer_json = json.dumps(answer)
                except (TypeError, ValueError):
                    return {"ok": False, "category": "interface", "reason": f"reference answer {answer!r:.80} is not JSON-serialisable ({where})"}
                answer_types.add(type(answer).__name__)
                stage = "verify"
                score = safe_verify(env, task, answer, [])
                if not score.passed:
                    return {"ok": False, "category": "reference_rejected", "reason": f"verifier rejects the reference answer ({where}): {score.reason}"[:600]}
                stage = "parse_answer"
                parsed = env.parse_answer(f"<answer>{answer_json}</answer>")
                score = safe_verify(env, task, parsed, [])
                if not score.passed:
                    return {"ok": False, "category": "reference_rejected", "reason": f"reference answer fails after the text round-trip ({where}): {score.reason}"[:600]}
                stage = "perturb"
                wrong = list(env.perturb(task, answer, random.Random(f"dsv-check/{seed}/{difficulty}")))
            except Exception as exc:
                return {"ok": False, "category": "crash", "reason": f"{stage} raised {_err(exc)} ({where})"}
            for bad in wrong + junk:
                if bad == answer and type(bad) is type(answer):
                    continue
                n_wrong += 1
                score = safe_verify(env, task, bad, [])
                if score.passed:
                    return {"ok": False, "category": "accepts_wrong", "reason": f"verifier accepts the wrong answer {bad!r:.80} ({where})"}
            n_tasks += 1
            if len(prompts) < req["n_prompts"]:
                prompts.append(task.prompt)
            if sample is None:
                sample = task.to_json()
    return {
        "ok": True, "name": name, "domain": cls.domain, "description": cls.description,
        "prompts": prompts, "sample_task": sample, "tools": sorted(tool_names),
        "answer_types": sorted(answer_types), "tasks_checked": n_tasks, "wrong_answers_checked": n_wrong,
    }


def _main():
    req = json.loads(sys.stdin.read())
    mode = req["mode"]
    try:
        cls = _load()
    except SyntaxError as exc:
        return {"ok": False, "category": "syntax_error", "reason": f"syntax error at line {exc.lineno}: {exc.msg}"}
    except Exception as exc:
        return {"ok": False, "category": "crash", "reason": f"import failed: {_err(exc)}"}
    from dsv.synth.env import AnswerFormatError, Task, ToolCallRecord, safe_verify
    from dsv.synth.tools import call_tool

    if mode == "check":
        return _check(cls, req)
    env = cls()
    if mode == "parse_answer":
        try:
            return {"ok": True, "answer": env.parse_answer(req["text"])}
        except AnswerFormatError as exc:
            return {"ok": False, "category": "answer_format", "reason": str(exc)}
        except Exception as exc:
            return {"ok": False, "category": "crash", "reason": f"parse_answer raised {_err(exc)}"}
    try:
        if mode == "generate":
            return {"ok": True, "task": env.generate(req["seed"], req["difficulty"]).to_json()}
        task = Task.from_json(req["task"])
        if mode == "solve":
            return {"ok": True, "answer": env.solve(task)}
        if mode == "perturb":
            return {"ok": True, "answers": env.perturb(task, req["answer"], random.Random(req["seed"]))}
        if mode == "call_tool":
            fns = _replay(env, task, req["history"])
            return {"ok": True, "result": call_tool(fns, req["name"], req["arguments"])}
        if mode == "verify":
            trace = [ToolCallRecord(t["name"], t["arguments"], t["result"]) for t in req["trace"]]
            _replay(env, task, [(t.name, t.arguments) for t in trace])
            s = safe_verify(env, task, req["answer"], trace)
            return {"ok": True, "score": {"reward": s.reward, "passed": s.passed, "reason": s.reason}}
    except Exception as exc:
        return {"ok": False, "category": "crash", "reason": f"{mode} raised {_err(exc)}"}
    return {"ok": False, "category": "harness", "reason": f"unknown mode {mode!r}"}


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


def run_harness(source: str, request: dict[str, Any], *, limits: Limits | None = None) -> HarnessReply:
    """Run the harness on proposal ``source`` with ``request``; ``HarnessError`` if no answer came back."""
    marker = _MARKER + secrets.token_hex(8) + ":"
    code = HARNESS_SOURCE.replace("__MARKER__", repr(marker))
    files = {**_runtime_files(), "proposal.py": source}
    result = run_python(code, files=files, stdin=json.dumps(request), limits=limits or default_limits())
    answer: dict[str, Any] | None = None
    for line in reversed(result.stdout.splitlines()):
        if line.startswith(marker):
            try:
                answer = json.loads(line[len(marker) :])
            except json.JSONDecodeError:
                answer = None
            break
    if result.status != "ok" or answer is None:
        category = _STATUS_CATEGORY.get(result.status, "crash")
        if result.status == "ok":
            category = "crash"
        tail = result.stderr.strip().splitlines()[-1:] if result.stderr.strip() else []
        detail = f": {tail[0][:300]}" if tail else ""
        if category == "timeout":
            msg = f"sandbox timeout after {result.wall_s:.1f}s wall / {result.cpu_s:.1f}s CPU"
        elif category == "output_limit":
            msg = "sandbox output limit exceeded"
        elif category == "memory":
            msg = "sandbox memory limit exceeded"
        else:
            msg = f"sandbox run failed (status {result.status}, exit {result.returncode}){detail}"
        if "Network is unreachable" in result.stderr or "Errno 101" in result.stderr:
            category, msg = "network", f"network access attempted (blocked by the sandbox){detail}"
        raise HarnessError(category, msg)
    return HarnessReply(answer, result)
