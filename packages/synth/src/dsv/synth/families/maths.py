"""Exact-answer maths: arithmetic chains, algebra word problems, combinatorics counting.

All answers are exact integers or fractions written `p/q`, so verification is a
comparison, never a tolerance. Difficulty grows the chain length / the number of
unknowns / the size of the counting problem.
"""

from __future__ import annotations

import ast
import math
import operator
import random
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from dsv.synth.env import DEFAULT_DIFFICULTY, Environment, Score, Task, ToolCallRecord
from dsv.synth.registry import register

__all__ = ["AlgebraWordEnv", "ArithmeticEnv", "CombinatoricsEnv", "parse_exact"]


def parse_exact(answer: Any) -> Fraction:
    """An exact number from an int, an integral float, or a string like "-12", "7/3", "2.5"."""
    if isinstance(answer, bool):
        raise ValueError("a boolean is not a number")
    if isinstance(answer, int):
        return Fraction(answer)
    if isinstance(answer, float):
        if not math.isfinite(answer):
            raise ValueError("not a finite number")
        return Fraction(answer).limit_denominator(10**6)
    if isinstance(answer, str):
        text = answer.strip().replace(" ", "").replace(",", "").rstrip(".")
        if text.startswith("\\boxed{") and text.endswith("}"):
            text = text[7:-1]
        if not text or len(text) > 200:
            raise ValueError("expected a number")
        return Fraction(text)
    raise ValueError(f"expected a number, got {type(answer).__name__}")


def _fmt(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _verify_exact(task: Task, answer: Any) -> Score:
    try:
        got = parse_exact(answer)
    except (ValueError, ZeroDivisionError) as exc:
        return Score.fail(f"answer is not an exact number: {exc}")
    want = Fraction(task.state["answer"])
    if got == want:
        return Score.ok()
    return Score.fail(f"wrong value {_fmt(got)}")


def _perturb_exact(answer: Any) -> list[Any]:
    x = parse_exact(answer)
    cands = [x + 1, x - 1, -x if x else Fraction(5), x * 2 if x else Fraction(2), x + Fraction(1, 2), x * 10]
    return [_fmt(c) for c in cands if c != x]


_EXACT_FORMAT = (
    "Finish with one line `Answer: <number>` (an integer, or an exact fraction p/q in lowest terms)."
)


_INT_OPS: dict[type, Callable[[int, int], int]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


_INT_OPS_BY_SYMBOL: dict[str, Callable[[int, int], int]] = {
    "*": operator.mul,
    "//": operator.floordiv,
    "%": operator.mod,
}


def int_expression_value(expr: str) -> int:
    """Value of an integer expression over + - * // % and parentheses, by walking its syntax tree.

    Python's own precedence and floor semantics (it parses with `ast`), without compiling or running
    code. ValueError for anything else.
    """

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.BinOp) and type(node.op) in _INT_OPS:
            return _INT_OPS[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        raise ValueError(f"not an integer expression: {ast.dump(node)[:80]}")

    return walk(ast.parse(expr, mode="eval").body)


@register
class ArithmeticEnv(Environment):
    name = "arithmetic"
    domain = "maths"
    description = "Evaluate a chain of integer operations (+, -, *, //, %) with parentheses, exactly."
    difficulty_knobs = "operations = 2 + 2*difficulty; operand range grows with difficulty"

    def generate(self, seed: int, difficulty: int = DEFAULT_DIFFICULTY) -> Task:
        d = self._check_difficulty(difficulty)
        rng = self._rng(seed, d)
        hi = 10 ** min(1 + d, 4)
        expr = str(rng.randint(2, hi))
        # The value is kept up to date as the expression grows: `acc` is the sum of the finished
        # additive terms, `sign * term` the last one (a product chain). Precedence without the
        # parentheses is thereby exact, and no parsing is needed (`int_expression_value` is the
        # slow twin the tests compare against).
        acc, sign, term = 0, 1, int(expr)
        for _ in range(2 + 2 * d):
            op = rng.choice(["+", "-", "*", "//", "%"] if d >= 3 else ["+", "-", "*"])
            b = rng.randint(2, hi if op in "+-" else max(3, hi // 10 + 3))
            wrap = rng.random() < 0.6
            if op in "+-":
                acc, sign, term = acc + sign * term, (1 if op == "+" else -1), b
            else:
                term = _INT_OPS_BY_SYMBOL[op](term, b)
            if wrap:
                expr = f"({expr} {op} {b})"
                acc, sign, term = 0, 1, acc + sign * term
            else:
                expr = f"{expr} {op} {b}"
        value = acc + sign * term
        prompt = f"Compute the exact value of the following expression (// is floor division, % is modulo):\n\n{expr}"
        return self._task(
            seed, d, prompt, {"expression": expr, "answer": str(value)}, _EXACT_FORMAT, tools=[]
        )

    def solve(self, task: Task) -> Any:
        return int(task.state["answer"])

    def verify(self, task: Task, answer: Any, trace: list[ToolCallRecord] | None = None) -> Score:
        return _verify_exact(task, answer)

    def perturb(self, task: Task, answer: Any, rng: random.Random) -> list[Any]:
        return _perturb_exact(answer)


_NAMES = ["Ada", "Bram", "Chen", "Dara", "Emil", "Fatou", "Goran", "Hana", "Ivo", "Jun", "Kemal", "Lena"]
_ITEMS = ["apples", "stamps", "marbles", "coins", "books", "shells", "cards", "pens"]


@register
class AlgebraWordEnv(Environment):
    name = "algebra_word"
    domain = "maths"
    description = "Word problems that reduce to a system of linear equations with a unique rational solution."
    difficulty_knobs = (
        "unknowns = 1 + ceil(difficulty/2) (2..4 people); counts (3..100 x difficulty) and coefficients grow with it"
    )

    def generate(self, seed: int, difficulty: int = DEFAULT_DIFFICULTY) -> Task:
        d = self._check_difficulty(difficulty)
        rng = self._rng(seed, d)
        n = 1 + (d + 1) // 2
        people = rng.sample(_NAMES, n)
        item = rng.choice(_ITEMS)
        # 3..100d: wide enough that no count is the answer of more than a few seeds in a hundred
        # (3..20d made the most common reference answer pass 6% of the tasks at difficulty 2).
        values = [rng.randint(3, 100 * d) for _ in range(n)]
        facts: list[str] = []
        # Chain of relations guarantees a unique solution: total + pairwise relations.
        facts.append(f"Together {', '.join(people[:-1])} and {people[-1]} have {sum(values)} {item}.")
        for i in range(1, n):
            a, b = people[i], people[i - 1]
            k = rng.randint(2, 2 + d)
            diff = values[i] - k * values[i - 1]
            if diff >= 0:
                facts.append(f"{a} has {diff} more than {k} times as many as {b}.")
            else:
                facts.append(f"{a} has {-diff} fewer than {k} times as many as {b}.")
        rng.shuffle(facts)
        target = rng.randrange(n)
        ask = rng.choice(["how many", "product"]) if d >= 4 else "how many"
        if ask == "product":
            question = f"What is the product of the number of {item} {people[0]} has and the number {people[-1]} has?"
            answer = values[0] * values[-1]
        else:
            question = f"How many {item} does {people[target]} have?"
            answer = values[target]
        prompt = " ".join(facts) + " " + question
        state = {"people": people, "values": values, "answer": str(answer)}
        return self._task(seed, d, prompt, state, _EXACT_FORMAT, tools=[])

    def solve(self, task: Task) -> Any:
        return int(task.state["answer"])

    def verify(self, task: Task, answer: Any, trace: list[ToolCallRecord] | None = None) -> Score:
        return _verify_exact(task, answer)

    def perturb(self, task: Task, answer: Any, rng: random.Random) -> list[Any]:
        others = [str(v) for v in task.state["values"] if str(v) != task.state["answer"]]
        return _perturb_exact(answer) + others


@register
class CombinatoricsEnv(Environment):
    name = "combinatorics"
    domain = "maths"
    description = (
        "Counting problems: committees, strings with restrictions, blocked lattice paths, balls in boxes."
    )
    difficulty_knobs = (
        "set sizes grow with difficulty; more restrictions (exclusions, blocked cells, minimums) as it grows"
    )

    def generate(self, seed: int, difficulty: int = DEFAULT_DIFFICULTY) -> Task:
        d = self._check_difficulty(difficulty)
        rng = self._rng(seed, d)
        kind = rng.choice(["committee", "strings", "lattice", "balls"])
        if kind == "committee":
            men, women = rng.randint(4, 6 + 2 * d), rng.randint(4, 6 + 2 * d)
            k_m, k_w = rng.randint(2, min(4, men)), rng.randint(1, min(4, women))
            answer = math.comb(men, k_m) * math.comb(women, k_w)
            text = (
                f"A club has {men} juniors and {women} seniors. In how many ways can a committee of exactly "
                f"{k_m} juniors and {k_w} seniors be chosen?"
            )
            if d >= 3:
                # two specific juniors refuse to serve together
                answer -= math.comb(men - 2, k_m - 2) * math.comb(women, k_w)
                text += " Two particular juniors refuse to serve together."
        elif kind == "strings":
            # (3..4+d letters, 4..5+2d long gave 24 questions at difficulty 2: one answer passed 5%)
            alphabet, length = rng.randint(3, 6 + 2 * d), rng.randint(4, 7 + 2 * d)
            banned = rng.randint(0, 1) if d >= 3 else 0
            # no two equal adjacent letters; optionally the first letter may not be the banned letter 'A'
            answer = (alphabet - banned) * (alphabet - 1) ** (length - 1)
            text = (
                f"How many strings of length {length} over an alphabet of {alphabet} letters have no two equal "
                f"adjacent letters?"
                + (" The first letter may not be A (A is one of the letters)." if banned else "")
            )
        elif kind == "lattice":
            w, h = rng.randint(3, 3 + 2 * d), rng.randint(3, 3 + 2 * d)
            blocked: set[tuple[int, int]] = set()
            while len(blocked) < max(1, d - 1):
                cell = (rng.randint(1, w - 1), rng.randint(0, h))
                blocked.add(cell)
            ways = [[0] * (h + 1) for _ in range(w + 1)]
            for x in range(w + 1):
                for y in range(h + 1):
                    if (x, y) in blocked:
                        continue
                    if x == 0 and y == 0:
                        ways[x][y] = 1
                        continue
                    ways[x][y] = (ways[x - 1][y] if x else 0) + (ways[x][y - 1] if y else 0)
            answer = ways[w][h]
            text = (
                f"Count the monotone lattice paths from (0,0) to ({w},{h}) using unit steps right (+1,0) and "
                f"up (0,+1). The points {sorted(blocked)} are blocked and may not be visited."
            )
        else:
            boxes, balls = rng.randint(3, 3 + d), rng.randint(10, 15 + 5 * d)
            least = rng.randint(1, 2) if d >= 2 else 0
            if balls - boxes * least < 1:
                least = 0
            answer = math.comb(balls - boxes * least + boxes - 1, boxes - 1)
            text = f"In how many ways can {balls} identical balls be put into {boxes} distinct boxes" + (
                f" so that every box gets at least {least}?" if least else "?"
            )
        return self._task(seed, d, text, {"kind": kind, "answer": str(answer)}, _EXACT_FORMAT, tools=[])

    def solve(self, task: Task) -> Any:
        return int(task.state["answer"])

    def verify(self, task: Task, answer: Any, trace: list[ToolCallRecord] | None = None) -> Score:
        return _verify_exact(task, answer)

    def perturb(self, task: Task, answer: Any, rng: random.Random) -> list[Any]:
        return _perturb_exact(answer)
