"""Code tasks: repair (or implement) a function in a small multi-file Python repo.

The repo has a few modules built from a catalogue of small functions; one or more
carry an injected bug (difficulty 1: a function body is missing and must be
implemented). The model gets file tools (list, read, write) and a `run_python`
tool that executes a snippet against its working copy in the sandbox. Hidden
tests decide. Reward is the fraction of hidden tests passed; `passed` needs all of them.

Judging is kept out of reach of the answer's code. Each hidden test is a list of
assertions `assert f(args) == expected` (or `assert f(args)` / `assert not f(args)`),
split on the host into calls and expectations. Only the calls (function, arguments)
go into the sandbox, where a small caller program imports the answer's modules, makes
each call and prints the returned values as type-tagged JSON. The expectations never
leave the host: the verdict is the host comparing the decoded values with them. An
answer that patches the test runner, forges output or exits early therefore gains
nothing. It would have to return the right values, which is what the tests ask.

Answer: a JSON object {"path": "full new file content", ...} of changed files.
"""

from __future__ import annotations

import ast
import json
import random
import secrets
from collections.abc import Callable
from typing import Any

from dsv.synth.env import DEFAULT_DIFFICULTY, Environment, Score, Task, ToolCallRecord
from dsv.synth.registry import register
from dsv.synth.sandbox import Limits, run_python

__all__ = ["CodeRepairEnv", "HiddenTestFormatError", "judge_calls", "split_test"]

# name -> (source, hidden tests, [(original, mutant), ...]); every mutant fails the tests.
_CATALOGUE: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    "clamp": (
        'def clamp(x, lo, hi):\n    """x limited to the closed range [lo, hi]."""\n'
        "    if x < lo:\n        return lo\n    if x > hi:\n        return hi\n    return x\n",
        "assert clamp(5, 0, 3) == 3\nassert clamp(-2, 0, 3) == 0\nassert clamp(2, 0, 3) == 2\n"
        "assert clamp(0, 0, 3) == 0\nassert clamp(3, 0, 3) == 3\n",
        [("if x < lo:\n        return lo", "if x < lo:\n        return hi"), ("if x > hi:", "if x >= lo:")],
    ),
    "running_max": (
        'def running_max(xs):\n    """List whose i-th item is max(xs[:i+1])."""\n    out = []\n    best = None\n'
        "    for x in xs:\n        if best is None or x > best:\n            best = x\n        out.append(best)\n"
        "    return out\n",
        "assert running_max([1, 3, 2, 5, 4]) == [1, 3, 3, 5, 5]\nassert running_max([]) == []\n"
        "assert running_max([-3, -5]) == [-3, -3]\n",
        [("x > best", "x < best"), ("        out.append(best)\n", "        out.append(x)\n")],
    ),
    "word_count": (
        'def word_count(text):\n    """Dict of lower-cased word -> occurrences (words split on whitespace)."""\n'
        "    counts = {}\n    for w in text.lower().split():\n        counts[w] = counts.get(w, 0) + 1\n"
        "    return counts\n",
        "assert word_count('a B a') == {'a': 2, 'b': 1}\nassert word_count('') == {}\n"
        "assert word_count('x  x\\nx') == {'x': 3}\n",
        [("counts.get(w, 0) + 1", "counts.get(w, 1)"), ("text.lower().split()", "text.split()")],
    ),
    "is_palindrome": (
        'def is_palindrome(s):\n    """True if s reads the same backwards, ignoring case and non-letters."""\n'
        "    t = [c.lower() for c in s if c.isalpha()]\n    return t == t[::-1]\n",
        "assert is_palindrome('Never odd or even')\nassert not is_palindrome('abca')\n"
        "assert is_palindrome('')\nassert is_palindrome('A man, a plan, a canal: Panama')\n",
        [
            ("c.lower() for c in s if c.isalpha()", "c for c in s if c.isalpha()"),
            ("t == t[::-1]", "t == t[1:][::-1]"),
        ],
    ),
    "chunk": (
        'def chunk(xs, n):\n    """Split xs into consecutive lists of length n (the last may be shorter)."""\n'
        "    return [xs[i : i + n] for i in range(0, len(xs), n)]\n",
        "assert chunk([1, 2, 3, 4, 5], 2) == [[1, 2], [3, 4], [5]]\nassert chunk([], 3) == []\n"
        "assert chunk([1, 2, 3], 3) == [[1, 2, 3]]\n",
        [("range(0, len(xs), n)", "range(0, len(xs) - 1, n)"), ("xs[i : i + n]", "xs[i : i + n - 1]")],
    ),
    "gcd": (
        'def gcd(a, b):\n    """Greatest common divisor of two non-negative integers."""\n'
        "    while b:\n        a, b = b, a % b\n    return a\n",
        "assert gcd(12, 18) == 6\nassert gcd(7, 0) == 7\nassert gcd(0, 9) == 9\nassert gcd(17, 5) == 1\n",
        [("a, b = b, a % b", "a, b = b, b % a"), ("    return a\n", "    return b\n")],
    ),
    "dedupe": (
        'def dedupe(xs):\n    """Items of xs without repeats, keeping the first occurrence order."""\n'
        "    seen = set()\n    out = []\n    for x in xs:\n        if x not in seen:\n            seen.add(x)\n"
        "            out.append(x)\n    return out\n",
        "assert dedupe([3, 1, 3, 2, 1]) == [3, 1, 2]\nassert dedupe([]) == []\nassert dedupe(['a', 'a']) == ['a']\n",
        [
            ("if x not in seen:", "if x in seen or not seen:"),
            ("    return out\n", "    return sorted(out)\n"),
        ],
    ),
    "to_roman": (
        'def to_roman(n):\n    """Roman numeral for 1 <= n <= 3999."""\n'
        "    vals = [(1000, 'M'), (900, 'CM'), (500, 'D'), (400, 'CD'), (100, 'C'), (90, 'XC'),\n"
        "            (50, 'L'), (40, 'XL'), (10, 'X'), (9, 'IX'), (5, 'V'), (4, 'IV'), (1, 'I')]\n"
        "    out = ''\n    for v, s in vals:\n        while n >= v:\n            out += s\n            n -= v\n"
        "    return out\n",
        "assert to_roman(1994) == 'MCMXCIV'\nassert to_roman(4) == 'IV'\nassert to_roman(3999) == 'MMMCMXCIX'\n"
        "assert to_roman(58) == 'LVIII'\n",
        [("while n >= v:", "while n > v:"), ("(4, 'IV'), ", "")],
    ),
}

_MODULES = ["utils", "textkit", "numbers", "listops"]


@register
class CodeRepairEnv(Environment):
    name = "code_repair"
    domain = "code"
    description = (
        "Fix (or implement) functions in a small multi-file Python repo; hidden tests run in the sandbox."
    )
    difficulty_knobs = (
        "1: implement a missing body; 2-3: one injected bug among 2-3 files; 4-5: two bugs, more files"
    )
    limits = Limits(cpu_s=5, wall_s=10, memory_mb=256, output_bytes=64_000)

    def generate(self, seed: int, difficulty: int = DEFAULT_DIFFICULTY) -> Task:
        d = self._check_difficulty(difficulty)
        rng = self._rng(seed, d)
        n_funcs = min(len(_CATALOGUE), 2 + d)
        funcs = rng.sample(sorted(_CATALOGUE), n_funcs)
        n_files = min(len(_MODULES), 1 + (d + 1) // 2)
        modules = rng.sample(_MODULES, n_files)
        placement = {f: modules[i % n_files] for i, f in enumerate(funcs)}
        targets = rng.sample(funcs, 2 if d >= 4 else 1)
        correct: dict[str, str] = {}
        broken: dict[str, str] = {}
        for mod in modules:
            names = [f for f in funcs if placement[f] == mod]
            good_parts, bad_parts = [], []
            for f in names:
                src, _, mutants = _CATALOGUE[f]
                good_parts.append(src)
                if f in targets:
                    if d == 1:
                        head = src.split('"""')[0] + '"""' + src.split('"""')[1] + '"""\n'
                        bad_parts.append(head + "    raise NotImplementedError\n")
                    else:
                        orig, mutant = rng.choice(mutants)
                        assert orig in src, f"catalogue mutant for {f} does not apply"
                        bad_parts.append(src.replace(orig, mutant, 1))
                else:
                    bad_parts.append(src)
            header = f'"""{mod}: small helpers."""\n\n\n'
            correct[f"{mod}.py"] = header + "\n\n".join(good_parts)
            broken[f"{mod}.py"] = header + "\n\n".join(bad_parts)
        init_lines = [f"from {placement[f]} import {f}" for f in funcs]
        broken["README.md"] = (
            "Helpers: "
            + ", ".join(f"`{f}` ({placement[f]}.py)" for f in funcs)
            + ". Docstrings state the contract.\n"
        )
        hidden = "\n".join(init_lines) + "\n" + "".join(_CATALOGUE[f][1] for f in funcs)
        tests = [{"name": f, "code": f"from {placement[f]} import {f}\n{_CATALOGUE[f][1]}"} for f in funcs]
        what = "implement the missing function body" if d == 1 else "find and fix the bug(s)"
        prompt = (
            f"This repository has {len(modules)} module(s): {', '.join(sorted(broken))}. Some hidden tests fail: "
            f"{what} so that every function meets its docstring. Use the tools to read the files and try code. "
            f"Change only what is needed."
        )
        state = {
            "files": broken,
            "solution": {k: correct[k] for k in correct if correct[k] != broken[k]},
            "tests": tests,
            "all_tests": hidden,
        }
        fmt = 'Finish with `Answer: {"<file>.py": "<complete new content>", ...}` (JSON, only the files you changed).'
        return self._task(seed, d, prompt, state, fmt)

    def tools(self, task: Task) -> list[Callable[..., Any]]:
        files: dict[str, str] = dict(task.state["files"])  # this episode's working copy
        limits = self.limits

        def list_files() -> str:
            """List the repository's files."""
            return json.dumps(sorted(files))

        def read_file(path: str) -> str:
            """Read a file of the repository.

            Args:
                path: file name as listed by list_files.
            """
            return files.get(path, f"error: no file {path!r}")

        def write_file(path: str, content: str) -> str:
            """Replace a file's content in the working copy (used by run_python afterwards).

            Args:
                path: file name (a new .py file may be created).
                content: the complete new content.
            """
            if "/" in path or not path.endswith((".py", ".md", ".txt")):
                return "error: path must be a plain file name ending in .py, .md or .txt"
            files[path] = content
            return f"wrote {len(content)} characters to {path}"

        def run_python(code: str) -> str:
            """Run a Python snippet next to the working copy (sandboxed: no network, 5 s CPU).

            Args:
                code: Python source; print what you want to see.
            """
            from dsv.synth.sandbox import run_python as sandboxed

            r = sandboxed(code, files=files, limits=limits)
            return json.dumps({"status": r.status, "stdout": r.stdout[-4000:], "stderr": r.stderr[-4000:]})

        return [list_files, read_file, write_file, run_python]

    def solve(self, task: Task) -> Any:
        return dict(task.state["solution"])

    def verify(self, task: Task, answer: Any, trace: list[ToolCallRecord] | None = None) -> Score:
        if not isinstance(answer, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in answer.items()
        ):
            return Score.fail('expected a JSON object {"file.py": "content", ...}')
        bad = [k for k in answer if "/" in k or k.startswith(".") or not k.endswith(".py")]
        if bad:
            return Score.fail(f"answer may only contain top-level .py files, got {bad}")
        files = {**task.state["files"], **answer}
        try:
            plans = [(t["name"], split_test(t["code"])) for t in task.state["tests"]]
        except (HiddenTestFormatError, KeyError, TypeError) as exc:
            return Score.fail(f"task has malformed hidden tests: {exc}")
        calls = [
            {"id": f"{i}.{j}", "module": module, "fn": fn, "args": args}
            for i, (_, cases) in enumerate(plans)
            for j, (module, fn, args, _) in enumerate(cases)
        ]
        outcomes = judge_calls(files, calls, self.limits)
        if outcomes is None:
            return Score.fail(
                "hidden tests did not complete (the answer's code crashed, hung or exited early)"
            )
        results: dict[str, str] = {}
        for i, (name, cases) in enumerate(plans):
            results[name] = "pass"
            for j, (_, fn, _args, expect) in enumerate(cases):
                verdict = _judge_one(outcomes.get(f"{i}.{j}"), expect)
                if verdict != "pass":
                    results[name] = f"{fn}: {verdict}"
                    break
        names = [name for name, _ in plans]
        passed = [n for n in names if results[n] == "pass"]
        reward = len(passed) / len(names)
        if len(passed) == len(names):
            return Score.ok(f"all {len(names)} hidden tests pass")
        failing = [f"{n} ({results[n]})" for n in names if n not in passed]
        return Score.fail(f"hidden tests failing: {', '.join(failing)}", reward=reward)

    def perturb(self, task: Task, answer: Any, rng: random.Random) -> list[Any]:
        out: list[Any] = [{}]  # the untouched, broken repo
        for path, content in answer.items():
            for _f, (src, _, mutants) in _CATALOGUE.items():
                if src in content:  # mutate inside that function only: snippets recur across functions
                    orig, mutant = rng.choice(mutants)
                    out.append({**answer, path: content.replace(src, src.replace(orig, mutant, 1), 1)})
        return out[:4]


class HiddenTestFormatError(ValueError):
    """A hidden test is not a list of `assert f(literal, ...) == literal` style statements."""


_Expect = tuple[str, Any]  # ("eq", value) | ("true", None) | ("false", None)


def split_test(code: str) -> list[tuple[str, str, list[Any], _Expect]]:
    """Split a hidden test into (module, function, args, expectation) calls; parsed on the host, never run.

    Accepted statements: `from MODULE import F` and `assert F(literals...)`, `assert not F(...)`,
    `assert F(...) == literal`.
    """
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        raise HiddenTestFormatError(f"syntax error at line {exc.lineno}") from None
    modules: dict[str, str] = {}
    out: list[tuple[str, str, list[Any], _Expect]] = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                modules[alias.asname or alias.name] = node.module
            continue
        if not isinstance(node, ast.Assert):
            raise HiddenTestFormatError(f"line {node.lineno}: only imports and asserts are allowed")
        test = node.test
        expect: _Expect = ("true", None)
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            test, expect = test.operand, ("false", None)
        elif isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq):
            try:
                expect = ("eq", ast.literal_eval(test.comparators[0]))
            except ValueError:
                raise HiddenTestFormatError(f"line {node.lineno}: expected value is not a literal") from None
            test = test.left
        if not (isinstance(test, ast.Call) and isinstance(test.func, ast.Name) and not test.keywords):
            raise HiddenTestFormatError(f"line {node.lineno}: expected a call of an imported function")
        fn = test.func.id
        if fn not in modules:
            raise HiddenTestFormatError(f"line {node.lineno}: {fn} is not imported")
        try:
            args = [ast.literal_eval(a) for a in test.args]
        except ValueError:
            raise HiddenTestFormatError(f"line {node.lineno}: arguments must be literals") from None
        out.append((modules[fn], fn, args, expect))
    if not out:
        raise HiddenTestFormatError("no assertions")
    return out


# The only program that runs next to the answer's code. It makes the calls and reports values;
# it never sees an expected value, so tampering with it cannot produce a pass.
_CALLER = r"""
import importlib, json, sys
MARK = sys.argv[1]

def enc(v, depth=0):
    if depth > 50:
        return {"t": "deep"}
    if v is None or isinstance(v, (bool, str)):
        return {"t": type(v).__name__, "v": v}
    if isinstance(v, int):
        return {"t": "int", "v": str(v)}
    if isinstance(v, float):
        return {"t": "float", "v": repr(v)}
    if isinstance(v, (list, tuple, set, frozenset)):
        items = sorted(v, key=repr) if isinstance(v, (set, frozenset)) else v
        return {"t": type(v).__name__, "v": [enc(x, depth + 1) for x in items]}
    if isinstance(v, dict):
        return {"t": "dict", "v": [[enc(k, depth + 1), enc(x, depth + 1)] for k, x in v.items()]}
    return {"t": "other", "v": type(v).__name__}

calls = json.loads(sys.stdin.read())
out = {}
for c in calls:
    try:
        value = getattr(importlib.import_module(c["module"]), c["fn"])(*c["args"])
        out[c["id"]] = {"value": enc(value)}
    except BaseException as exc:
        out[c["id"]] = {"error": type(exc).__name__}
sys.stdout.write("\n" + MARK + json.dumps(out) + "\n")
"""

_SCALARS: dict[str, type] = {"NoneType": type(None), "bool": bool, "str": str}


def _decode(node: Any, depth: int = 0) -> Any:
    """A value from the caller's type-tagged JSON; ValueError on anything malformed."""
    if depth > 60 or not isinstance(node, dict) or "t" not in node:
        raise ValueError("malformed value")
    t, v = node["t"], node.get("v")
    if t in _SCALARS:
        if not isinstance(v, _SCALARS[t]):
            raise ValueError("malformed scalar")
        return v
    if t == "int" and isinstance(v, str) and len(v) <= 4000:
        return int(v)
    if t == "float" and isinstance(v, str):
        return float(v)
    if t in ("list", "tuple", "set", "frozenset") and isinstance(v, list):
        items = [_decode(x, depth + 1) for x in v]
        return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[t](items)
    if t == "dict" and isinstance(v, list):
        return {_decode(k, depth + 1): _decode(x, depth + 1) for k, x in v}
    raise ValueError(f"value of type {t!r} cannot be compared")


def _judge_one(outcome: Any, expect: _Expect) -> str:
    """'pass' or why this call fails, from the untrusted outcome record and the host's expectation."""
    if not isinstance(outcome, dict):
        return "no result"
    if "error" in outcome:
        return f"raised {str(outcome['error'])[:60]}"
    try:
        value = _decode(outcome.get("value"))
        kind, want = expect
        ok = bool(value) if kind == "true" else (not value) if kind == "false" else value == want
    except (ValueError, TypeError, RecursionError, OverflowError):
        return "unreadable result"
    return "pass" if ok else "wrong value"


def judge_calls(files: dict[str, str], calls: list[dict[str, Any]], limits: Limits) -> dict[str, Any] | None:
    """Run `calls` against `files` in the sandbox; the raw outcome per call id, or None if none came back.

    The outcomes are untrusted data: callers compare them with expectations kept on the host.
    """
    mark = f"@@dsv-calls-{secrets.token_hex(8)}:"
    r = run_python(_CALLER, files=files, stdin=json.dumps(calls), args=[mark], limits=limits)
    for line in reversed(r.stdout.splitlines()):
        if line.startswith(mark):
            try:
                data = json.loads(line[len(mark) :])
            except (json.JSONDecodeError, RecursionError):
                return None
            return data if isinstance(data, dict) else None
    return None
