"""Logic puzzles: knights and knaves, sudoku, zebra-style assignment puzzles.

Generators keep adding clues until a brute-force checker finds exactly one
solution, so every task is solvable and its answer unique; verifiers check the
answer against the constraints (and the givens), not just against a stored key.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from dsv.synth.env import DEFAULT_DIFFICULTY, Environment, Score, Task, ToolCallRecord
from dsv.synth.registry import register

__all__ = ["KnightsKnavesEnv", "SudokuEnv", "ZebraEnv"]

_PEOPLE = [
    "Avery",
    "Blake",
    "Casey",
    "Devon",
    "Emery",
    "Finley",
    "Gray",
    "Harper",
    "Indy",
    "Jules",
    "Kai",
    "Lane",
]


# ---- knights and knaves -------------------------------------------------------------------
def _kk_eval(stmt: list, world: dict[str, bool]) -> bool:
    kind = stmt[0]
    if kind == "is":  # ["is", person, True=knight]
        return world[stmt[1]] == stmt[2]
    if kind == "and":
        return _kk_eval(stmt[1], world) and _kk_eval(stmt[2], world)
    if kind == "or":
        return _kk_eval(stmt[1], world) or _kk_eval(stmt[2], world)
    if kind == "same":
        return world[stmt[1]] == world[stmt[2]]
    if kind == "count":  # ["count", n]: exactly n knights among everyone
        return sum(world.values()) == stmt[1]
    raise ValueError(f"unknown statement {kind}")


def _kk_text(stmt: list) -> str:
    kind = stmt[0]
    if kind == "is":
        return f"{stmt[1]} is a {'knight' if stmt[2] else 'knave'}"
    if kind == "and":
        return f"{_kk_text(stmt[1])} and {_kk_text(stmt[2])}"
    if kind == "or":
        return f"{_kk_text(stmt[1])} or {_kk_text(stmt[2])}"
    if kind == "same":
        return f"{stmt[1]} and {stmt[2]} are of the same kind"
    return f"exactly {stmt[1]} of us {'is a knight' if stmt[1] == 1 else 'are knights'}"


def _kk_solutions(people: list[str], claims: list[tuple[str, list]]) -> list[dict[str, bool]]:
    sols = []
    for bits in itertools.product([True, False], repeat=len(people)):
        world = dict(zip(people, bits, strict=True))
        if all(_kk_eval(stmt, world) == world[speaker] for speaker, stmt in claims):
            sols.append(world)
    return sols


def _role_answer(answer: Any, people: list[str]) -> dict[str, bool]:
    if not isinstance(answer, dict):
        raise ValueError(
            f"expected a JSON object mapping each name to knight/knave, got {type(answer).__name__}"
        )
    out = {}
    for name, role in answer.items():
        role_s = str(role).strip().lower()
        if role_s not in ("knight", "knave"):
            raise ValueError(f"role of {name} must be 'knight' or 'knave', got {role!r}")
        out[str(name).strip()] = role_s == "knight"
    missing = sorted(set(people) - set(out))
    if missing:
        raise ValueError(f"no role given for {missing}")
    return out


@register
class KnightsKnavesEnv(Environment):
    name = "knights_knaves"
    domain = "logic"
    description = "Islanders are knights (always truthful) or knaves (always lying); deduce who is which."
    difficulty_knobs = (
        "people = 3 + difficulty (4..8); compound statements (and/or/same/count) from difficulty 2"
    )

    def generate(self, seed: int, difficulty: int = DEFAULT_DIFFICULTY) -> Task:
        d = self._check_difficulty(difficulty)
        rng = self._rng(seed, d)
        n = 3 + d
        people = rng.sample(_PEOPLE, n)
        truth = {p: rng.random() < 0.5 for p in people}
        if all(truth.values()) or not any(truth.values()):  # uniform worlds make trivial guesses pass
            truth[people[rng.randrange(n)]] = not truth[people[0]]
        claims: list[tuple[str, list]] = []
        for _ in range(200):
            speaker = rng.choice(people)
            a, b = rng.sample(people, 2)
            kinds = ["is"] + (["and", "or", "same", "count"] if d >= 2 else ["same"])
            kind = rng.choice(kinds)
            if kind == "is":
                stmt: list = ["is", a, rng.random() < 0.5]
            elif kind in ("and", "or"):
                stmt = [kind, ["is", a, rng.random() < 0.5], ["is", b, rng.random() < 0.5]]
            elif kind == "same":
                stmt = ["same", a, b]
            else:
                stmt = ["count", rng.randint(1, n - 1)]
            # A knight's statement is true, a knave's false: keep the claim consistent with the planted world.
            if _kk_eval(stmt, truth) != truth[speaker]:
                continue
            claims.append((speaker, stmt))
            if len(_kk_solutions(people, claims)) == 1:
                break
        assert len(_kk_solutions(people, claims)) == 1, "knights/knaves generator failed to reach uniqueness"
        lines = [f'{speaker} says: "{_kk_text(stmt)}."' for speaker, stmt in claims]
        prompt = (
            f"On an island every inhabitant is a knight, who always tells the truth, or a knave, who always lies. "
            f"You meet {', '.join(people)}.\n" + "\n".join(lines) + "\nWho is a knight and who is a knave?"
        )
        state = {"people": people, "claims": [[s, c] for s, c in claims], "solution": truth}
        fmt = 'Finish with one line `Answer: {"Name": "knight" | "knave", ...}` (a JSON object naming everyone).'
        return self._task(seed, d, prompt, state, fmt, tools=[])

    def solve(self, task: Task) -> Any:
        return {p: "knight" if k else "knave" for p, k in task.state["solution"].items()}

    def verify(self, task: Task, answer: Any, trace: list[ToolCallRecord] | None = None) -> Score:
        people = task.state["people"]
        try:
            roles = _role_answer(answer, people)
        except ValueError as exc:
            return Score.fail(str(exc))
        for speaker, stmt in task.state["claims"]:
            if _kk_eval(stmt, roles) != roles[speaker]:
                return Score.fail(f'inconsistent: {speaker} would not say "{_kk_text(stmt)}"')
        return Score.ok("consistent with every statement")

    def perturb(self, task: Task, answer: Any, rng: random.Random) -> list[Any]:
        out = []
        for p in answer:
            bad = dict(answer)
            bad[p] = "knave" if answer[p] == "knight" else "knight"
            out.append(bad)
        out.append({p: "knight" if r == "knave" else "knave" for p, r in answer.items()})
        return out


# ---- sudoku -----------------------------------------------------------------------------------
def _sudoku_solve(grid: list[int], size: int, box_r: int, box_c: int, limit: int = 2) -> list[list[int]]:
    """All solutions up to `limit` (backtracking with most-constrained cell first)."""
    sols: list[list[int]] = []
    g = list(grid)

    def cands(i: int) -> set[int]:
        r, c = divmod(i, size)
        used = {g[r * size + k] for k in range(size)} | {g[k * size + c] for k in range(size)}
        br, bc = r - r % box_r, c - c % box_c
        used |= {g[(br + a) * size + bc + b] for a in range(box_r) for b in range(box_c)}
        return set(range(1, size + 1)) - used

    def rec() -> None:
        if len(sols) >= limit:
            return
        empties = [i for i, v in enumerate(g) if v == 0]
        if not empties:
            sols.append(list(g))
            return
        best = min(empties, key=lambda i: len(cands(i)))
        for v in sorted(cands(best)):
            g[best] = v
            rec()
            g[best] = 0

    rec()
    return sols


@register
class SudokuEnv(Environment):
    name = "sudoku"
    domain = "logic"
    description = "Fill a sudoku grid (4x4, 6x6 or 9x9) so every row, column and box holds each digit once."
    difficulty_knobs = "1: 4x4, 2: 6x6, 3-5: 9x9 with fewer givens as difficulty grows"

    def generate(self, seed: int, difficulty: int = DEFAULT_DIFFICULTY) -> Task:
        d = self._check_difficulty(difficulty)
        rng = self._rng(seed, d)
        size, box_r, box_c = {1: (4, 2, 2), 2: (6, 2, 3)}.get(d, (9, 3, 3))
        # A random full grid: shuffle digits, rows within bands, columns within stacks of a base pattern.
        base = [[(box_c * (r % box_r) + r // box_r + c) % size + 1 for c in range(size)] for r in range(size)]
        digits = list(range(1, size + 1))
        rng.shuffle(digits)
        bands = list(range(size // box_r))
        rng.shuffle(bands)
        rows = [b * box_r + r for b in bands for r in rng.sample(range(box_r), box_r)]
        stacks = list(range(size // box_c))
        rng.shuffle(stacks)
        cols = [s * box_c + c for s in stacks for c in rng.sample(range(box_c), box_c)]
        full = [digits[base[r][c] - 1] for r in rows for c in cols]
        puzzle = list(full)
        target_givens = {1: 6, 2: 14, 3: 36, 4: 30, 5: 26}[d]
        order = list(range(size * size))
        rng.shuffle(order)
        for i in order:
            if sum(1 for v in puzzle if v) <= target_givens:
                break
            keep = puzzle[i]
            puzzle[i] = 0
            if len(_sudoku_solve(puzzle, size, box_r, box_c)) != 1:
                puzzle[i] = keep
        text = "\n".join(
            " ".join(str(v) if v else "." for v in puzzle[r * size : (r + 1) * size]) for r in range(size)
        )
        prompt = (
            f"Solve this {size}x{size} sudoku (boxes are {box_r} rows x {box_c} columns; '.' marks an empty cell). "
            f"Every row, column and box must contain each of the digits 1-{size} exactly once.\n\n{text}"
        )
        state = {"size": size, "box": [box_r, box_c], "puzzle": puzzle, "solution": full}
        fmt = f"Finish with the completed grid: {size} lines of {size} digits separated by spaces, in a fenced block."
        return self._task(seed, d, prompt, state, fmt, tools=[])

    def parse_answer(self, text: str) -> Any:
        from dsv.synth.env import extract_answer_text

        return extract_answer_text(text) if "```" in text else text

    def solve(self, task: Task) -> Any:
        size = task.state["size"]
        sol = task.state["solution"]
        return "\n".join(" ".join(map(str, sol[r * size : (r + 1) * size])) for r in range(size))

    def _grid(self, task: Task, answer: Any) -> list[int]:
        size = task.state["size"]
        if isinstance(answer, list):
            flat = [v for row in answer for v in (row if isinstance(row, list) else [row])]
        elif isinstance(answer, str):
            flat = [int(ch) for ch in answer if ch.isdigit()]
        else:
            raise ValueError(f"expected a grid of digits, got {type(answer).__name__}")
        if len(flat) != size * size:
            raise ValueError(f"expected {size * size} digits, got {len(flat)}")
        return [int(v) for v in flat]

    def verify(self, task: Task, answer: Any, trace: list[ToolCallRecord] | None = None) -> Score:
        size = task.state["size"]
        box_r, box_c = task.state["box"]
        try:
            g = self._grid(task, answer)
        except (ValueError, TypeError) as exc:
            return Score.fail(str(exc))
        for i, given in enumerate(task.state["puzzle"]):
            if given and g[i] != given:
                return Score.fail(f"changes the given digit at row {i // size + 1}, column {i % size + 1}")
        want = set(range(1, size + 1))
        for k in range(size):
            if set(g[k * size : (k + 1) * size]) != want:
                return Score.fail(f"row {k + 1} does not hold each digit once")
            if {g[r * size + k] for r in range(size)} != want:
                return Score.fail(f"column {k + 1} does not hold each digit once")
        for br in range(0, size, box_r):
            for bc in range(0, size, box_c):
                if {g[(br + a) * size + bc + b] for a in range(box_r) for b in range(box_c)} != want:
                    return Score.fail(f"box at row {br + 1}, column {bc + 1} does not hold each digit once")
        return Score.ok("valid grid consistent with the givens")

    def perturb(self, task: Task, answer: Any, rng: random.Random) -> list[Any]:
        size = task.state["size"]
        g = self._grid(task, answer)
        out = []
        empties = [i for i, v in enumerate(task.state["puzzle"]) if v == 0]
        for _ in range(3):
            i, j = rng.sample(empties, 2) if len(empties) >= 2 else (0, 1)
            bad = list(g)
            bad[i], bad[j] = bad[j], bad[i]
            if bad != g:
                out.append(bad)
        bad = list(g)
        bad[empties[0]] = bad[empties[0]] % size + 1
        out.append(bad)
        out.append(g[:-1])
        return ["\n".join(" ".join(map(str, b[r * size : (r + 1) * size])) for r in range(size)) for b in out]


# ---- zebra ------------------------------------------------------------------------------------
_ATTRS = {
    "colour": ["red", "green", "blue", "yellow", "white", "black"],
    "pet": ["dog", "cat", "fish", "bird", "horse", "rabbit"],
    "drink": ["tea", "coffee", "milk", "juice", "water", "cocoa"],
    "job": ["baker", "pilot", "nurse", "judge", "chef", "poet"],
}


def _zebra_clue_holds(clue: list, sol: dict[str, list[str]]) -> bool:
    kind = clue[0]
    pos = {(cat, v): i for cat, vals in sol.items() for i, v in enumerate(vals)}
    if kind == "same":  # same house
        return pos[(clue[1], clue[2])] == pos[(clue[3], clue[4])]
    if kind == "left":  # directly left of
        return pos[(clue[1], clue[2])] + 1 == pos[(clue[3], clue[4])]
    if kind == "next":
        return abs(pos[(clue[1], clue[2])] - pos[(clue[3], clue[4])]) == 1
    if kind == "at":
        return pos[(clue[1], clue[2])] == clue[3]
    if kind == "not":
        return pos[(clue[1], clue[2])] != pos[(clue[3], clue[4])]
    raise ValueError(kind)


def _zebra_clue_text(clue: list) -> str:
    kind = clue[0]
    a = f"the {clue[1]} {clue[2]}" if clue[1] != "name" else clue[2]
    if kind == "at":
        return f"{a[0].upper() + a[1:]} is in house {clue[3] + 1}."
    b = f"the {clue[3]} {clue[4]}" if clue[3] != "name" else clue[4]
    a_cap = a[0].upper() + a[1:]
    return {
        "same": f"{a_cap} and {b} are in the same house.",
        "left": f"{a_cap} is directly left of {b}.",
        "next": f"{a_cap} is next to {b}.",
        "not": f"{a_cap} and {b} are not in the same house.",
    }[kind]


@register
class ZebraEnv(Environment):
    name = "zebra"
    domain = "logic"
    description = (
        "Zebra (Einstein) puzzle: houses in a row, attributes assigned by clues; answer one question."
    )
    difficulty_knobs = (
        "houses = min(5, 2 + difficulty); attribute categories besides name = min(3, 1 + difficulty // 2)"
    )

    def generate(self, seed: int, difficulty: int = DEFAULT_DIFFICULTY) -> Task:
        d = self._check_difficulty(difficulty)
        rng = self._rng(seed, d)
        n = min(5, 2 + d)
        cats = ["name", *rng.sample(list(_ATTRS), min(3, 1 + d // 2))]
        sol = {"name": rng.sample(_PEOPLE, n)}
        for c in cats[1:]:
            sol[c] = rng.sample(_ATTRS[c], n)
        domains = {c: sorted(sol[c]) for c in cats}
        clues: list[list] = []
        perms = [list(p) for p in itertools.permutations(range(n))]

        def count_solutions(limit: int = 2) -> int:
            # Each category is an independent permutation constrained by clues: search category by category.
            found = 0
            assignment: dict[str, list[str]] = {}

            def ok_partial() -> bool:
                for clue in clues:
                    cats_in = {clue[1]} | ({clue[3]} if clue[0] != "at" else set())
                    if cats_in <= set(assignment) and not _zebra_clue_holds(clue, assignment):
                        return False
                return True

            def rec(i: int) -> None:
                nonlocal found
                if found >= limit:
                    return
                if i == len(cats):
                    found += 1
                    return
                for p in perms:
                    assignment[cats[i]] = [domains[cats[i]][k] for k in p]
                    if ok_partial():
                        rec(i + 1)
                    del assignment[cats[i]]

            rec(0)
            return found

        for _ in range(400):
            c1, c2 = rng.choice(cats), rng.choice(cats)
            v1, v2 = rng.choice(sol[c1]), rng.choice(sol[c2])
            kind = rng.choice(["same", "same", "same", "left", "next", "next", "at", "not"])
            clue = ["at", c1, v1, sol[c1].index(v1)] if kind == "at" else [kind, c1, v1, c2, v2]
            if kind != "at" and (c1, v1) == (c2, v2):
                continue
            if kind in ("same", "not") and c1 == c2:  # says nothing: values of one attribute always differ
                continue
            if not _zebra_clue_holds(clue, sol) or clue in clues:
                continue
            clues.append(clue)
            if len(clues) >= n and count_solutions() == 1:
                break
        assert count_solutions() == 1, "zebra generator failed to reach uniqueness"
        listing = "; ".join(f"{c}: {', '.join(domains[c])}" for c in cats)
        prompt = (
            f"{n} houses stand in a row, numbered 1 to {n} from left to right. Each house has one value of each "
            f"attribute ({listing}), all different.\n"
            + "\n".join(f"{i + 1}. {_zebra_clue_text(c)}" for i, c in enumerate(clues))
            + "\nWork out every attribute of every house."
        )
        state = {"solution": sol, "clues": clues, "categories": cats}
        fmt = (
            'Finish with one line `Answer: {"name": [house 1, house 2, ...], "<attribute>": [...], ...}` '
            "(a JSON object with every attribute, values listed in house order)."
        )
        return self._task(seed, d, prompt, state, fmt, tools=[])

    def solve(self, task: Task) -> Any:
        return {c: list(v) for c, v in task.state["solution"].items()}

    def verify(self, task: Task, answer: Any, trace: list[ToolCallRecord] | None = None) -> Score:
        sol = task.state["solution"]
        if not isinstance(answer, dict):
            return Score.fail(f"expected a JSON object of attribute lists, got {type(answer).__name__}")
        got: dict[str, list[str]] = {}
        for cat, values in sol.items():
            row = answer.get(cat)
            if not isinstance(row, list) or len(row) != len(values):
                return Score.fail(f"attribute {cat!r} must be a list of {len(values)} values in house order")
            got[cat] = [str(v).strip().lower() for v in row]
            if sorted(got[cat]) != sorted(v.lower() for v in values):
                return Score.fail(f"attribute {cat!r} must use each of {sorted(values)} once")
        lowered = {c: [v.lower() for v in vals] for c, vals in sol.items()}
        for clue in task.state["clues"]:
            low = [x.lower() if isinstance(x, str) and i in (2, 4) else x for i, x in enumerate(clue)]
            if not _zebra_clue_holds(low, got):
                return Score.fail(f"violates clue: {_zebra_clue_text(clue)}")
        # The clues admit exactly one assignment (checked at generation), so this is the solution.
        if got != lowered:
            return Score.fail(
                "satisfies the clues but differs from the unique solution (verifier state corrupt)"
            )
        return Score.ok("satisfies every clue")

    def perturb(self, task: Task, answer: Any, rng: random.Random) -> list[Any]:
        out = []
        for cat in answer:
            bad = {c: list(v) for c, v in answer.items()}
            i, j = rng.sample(range(len(bad[cat])), 2)
            bad[cat][i], bad[cat][j] = bad[cat][j], bad[cat][i]
            out.append(bad)
        return out
