"""Code tasks: repair (or implement) a function in a small multi-file Python repo.

The repo has a few modules built from a catalogue of small functions; one or more
carry an injected bug (difficulty 1: a function body is missing and must be
implemented). The model gets file tools (list, read, write) and a `run_python`
tool that executes a snippet against its working copy in the sandbox. Hidden
tests decide: the verifier writes the answer's files over the repo and runs the
hidden tests in `dsv.synth.sandbox` (never in this process). Reward is the
fraction of hidden tests passed; `passed` needs all of them.

Answer: a JSON object {"path": "full new file content", ...} of changed files.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from dsv.synth.env import DEFAULT_DIFFICULTY, Environment, Score, Task, ToolCallRecord
from dsv.synth.registry import register
from dsv.synth.sandbox import Limits, run_python

__all__ = ["CodeRepairEnv"]

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
        # One sandbox run for all tests: each test runs isolated in its own namespace and reports.
        runner = (
            "import json, traceback\nresults = {}\n"
            f"tests = json.loads({json.dumps(json.dumps(task.state['tests']))})\n"
            "for t in tests:\n"
            "    try:\n        exec(compile(t['code'], t['name'], 'exec'), {'__name__': 'hidden_test'})\n"
            "        results[t['name']] = 'pass'\n"
            "    except BaseException as exc:\n"
            "        results[t['name']] = type(exc).__name__\n"
            "open('_results.json', 'w').write(json.dumps(results))\n"
        )
        r = run_python(runner, files=files, limits=self.limits, collect_files=["_results.json"])
        if "_results.json" not in r.files:
            return Score.fail(f"hidden tests did not complete (sandbox status {r.status})")
        try:
            results = json.loads(r.files["_results.json"])
        except json.JSONDecodeError:
            return Score.fail("hidden test results were tampered with")
        names = [t["name"] for t in task.state["tests"]]
        passed = [n for n in names if results.get(n) == "pass"]
        reward = len(passed) / len(names)
        if len(passed) == len(names):
            return Score.ok(f"all {len(names)} hidden tests pass")
        failing = [f"{n} ({results.get(n, 'missing')})" for n in names if n not in passed]
        return Score.fail(f"hidden tests failing: {', '.join(failing)}", reward=reward)

    def perturb(self, task: Task, answer: Any, rng: random.Random) -> list[Any]:
        out: list[Any] = [{}]  # the untouched, broken repo
        for path, content in answer.items():
            for _f, (src, _, mutants) in _CATALOGUE.items():
                if src in content:  # mutate inside that function only: snippets recur across functions
                    orig, mutant = rng.choice(mutants)
                    out.append({**answer, path: content.replace(src, src.replace(orig, mutant, 1), 1)})
        return out[:4]
