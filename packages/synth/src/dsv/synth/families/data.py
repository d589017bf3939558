"""Data and everyday-computation families: graph shortest paths, table transformations,
unit-conversion chains, and account ledgers.

Each answer is checked exactly: a path is re-walked and its length recomputed and
compared with Dijkstra's optimum; a table is compared cell by cell after the
specified transformation; conversions and balances are exact rationals.
"""

from __future__ import annotations

import heapq
import itertools
import json
import random
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from dsv.synth.env import DEFAULT_DIFFICULTY, Environment, Score, Task, ToolCallRecord
from dsv.synth.families.maths import _EXACT_FORMAT, _perturb_exact, _verify_exact
from dsv.synth.registry import register

__all__ = ["LedgerEnv", "ShortestPathEnv", "TableTransformEnv", "UnitConversionEnv"]

_STATIONS = [
    "Ash", "Birch", "Cedar", "Dale", "Elm", "Fern", "Glen", "Heath", "Iris", "Juniper", "Kestrel", "Larch",
    "Moss", "Nettle", "Oak", "Pine", "Quarry", "Reed", "Sorrel", "Thorn",
]  # fmt: skip


def sample_two(rng: random.Random, seq: list[str]) -> tuple[str, str]:
    """Exactly `rng.sample(seq, 2)` (same draws, same result) without its general-purpose overhead.

    This was the dominant cost of shortest_path's generate. It follows CPython's `Random.sample`:
    for k=2 a pool swap when len(seq) <= 21, else rejection of a repeated index. The tests compare
    it with `rng.sample` so a change there cannot go unnoticed.
    """
    n = len(seq)
    if n < 2:
        raise ValueError("need at least two items")
    below = rng._randbelow  # the primitive Random.sample draws with
    i = below(n)
    if n <= 21:
        j = below(n - 1)
        return seq[i], seq[n - 1] if j == i else seq[j]
    j = below(n)
    while j == i:
        j = below(n)
    return seq[i], seq[j]


@register
class ShortestPathEnv(Environment):
    name = "shortest_path"
    domain = "graphs"
    description = (
        "Find a minimum-cost route between two stations of a weighted road network (neighbour tool)."
    )
    difficulty_knobs = "stations = 5 + 3*difficulty; edges per station and weight range grow with difficulty"

    def generate(self, seed: int, difficulty: int = DEFAULT_DIFFICULTY) -> Task:
        d = self._check_difficulty(difficulty)
        rng = self._rng(seed, d)
        nodes = rng.sample(_STATIONS, min(len(_STATIONS), 5 + 3 * d))
        edges: dict[str, dict[str, int]] = {n: {} for n in nodes}
        order = list(nodes)
        rng.shuffle(order)
        for a, b in itertools.pairwise(order):  # a spanning path keeps the graph connected
            w = rng.randint(1, 9 + 3 * d)
            edges[a][b] = edges[b][a] = w
        for _ in range(len(nodes) * (1 + d // 2)):
            a, b = sample_two(rng, nodes)
            w = rng.randint(1, 9 + 3 * d)
            edges[a][b] = edges[b][a] = w
        src, dst = order[0], order[-1]
        dist = self._dijkstra(edges, src)
        state = {"edges": edges, "source": src, "target": dst, "best": dist[dst]}
        prompt = (
            f"Roads connect stations; each road has a travel cost. Find a cheapest route from {src} to {dst}. "
            f"Use the neighbours tool to explore the network (stations: {', '.join(sorted(nodes))})."
        )
        fmt = 'Finish with `Answer: ["<start>", ..., "<end>"]` (JSON list of stations along the route).'
        return self._task(seed, d, prompt, state, fmt)

    @staticmethod
    def _dijkstra(edges: dict[str, dict[str, int]], src: str) -> dict[str, int]:
        dist = {src: 0}
        heap = [(0, src)]
        while heap:
            du, u = heapq.heappop(heap)
            if du > dist.get(u, 1 << 60):
                continue
            for v, w in edges[u].items():
                if du + w < dist.get(v, 1 << 60):
                    dist[v] = du + w
                    heapq.heappush(heap, (du + w, v))
        return dist

    def tools(self, task: Task) -> list[Callable[..., Any]]:
        edges = task.state["edges"]

        def neighbours(station: str) -> str:
            """Roads leaving a station, as {neighbour: cost}.

            Args:
                station: station name.
            """
            if station not in edges:
                return f"error: unknown station {station!r}"
            return json.dumps(dict(sorted(edges[station].items())))

        return [neighbours]

    def solve(self, task: Task) -> Any:
        edges, src, dst = task.state["edges"], task.state["source"], task.state["target"]
        dist = self._dijkstra(edges, src)
        path = [dst]
        while path[-1] != src:
            u = path[-1]
            path.append(min((v for v in edges[u] if dist.get(v, 1 << 60) + edges[u][v] == dist[u]), key=str))
        return path[::-1]

    def verify(self, task: Task, answer: Any, trace: list[ToolCallRecord] | None = None) -> Score:
        st = task.state
        if not isinstance(answer, list) or not all(isinstance(x, str) for x in answer) or len(answer) < 2:
            return Score.fail("expected a JSON list of station names")
        if answer[0] != st["source"] or answer[-1] != st["target"]:
            return Score.fail(f"route must start at {st['source']} and end at {st['target']}")
        cost = 0
        for a, b in itertools.pairwise(answer):
            if b not in st["edges"].get(a, {}):
                return Score.fail(f"no road from {a} to {b}")
            cost += st["edges"][a][b]
        if cost != st["best"]:
            return Score.fail(f"route costs {cost}, the cheapest costs less")
        return Score.ok(f"optimal cost {cost}")

    def perturb(self, task: Task, answer: Any, rng: random.Random) -> list[Any]:
        out: list[Any] = [answer[::-1], answer[:-1]]
        edges = task.state["edges"]
        if len(answer) > 2:
            skip = [answer[0], *answer[2:]]  # skip a hop: no road, or a road of a different cost
            if answer[2] not in edges[answer[0]] or edges[answer[0]][answer[2]] != (
                edges[answer[0]][answer[1]] + edges[answer[1]][answer[2]]
            ):
                out.append(skip)
        # a detour through a neighbour and back costs more
        a = answer[0]
        nb = sorted(task.state["edges"][a])[0]
        out.append([a, nb, a, *answer[1:]])
        return [o for o in out if o != answer]


@register
class TableTransformEnv(Environment):
    name = "table_transform"
    domain = "data"
    description = (
        "Transform a CSV table: filter, derive a column, group and aggregate, sort; answer as JSON rows."
    )
    difficulty_knobs = (
        "rows = 6 + 4*difficulty; steps = filter (1), +derive (2), +group/aggregate (3+), +sort/limit (4+)"
    )

    def generate(self, seed: int, difficulty: int = DEFAULT_DIFFICULTY) -> Task:
        d = self._check_difficulty(difficulty)
        rng = self._rng(seed, d)
        regions = rng.sample(["north", "south", "east", "west", "centre"], 3)
        products = rng.sample(["bolt", "nut", "gear", "spring", "valve", "pump"], 4)
        rows = [
            {
                "id": i + 1,
                "region": rng.choice(regions),
                "product": rng.choice(products),
                "units": rng.randint(1, 40),
                "price": rng.randint(2, 30),
            }
            for i in range(6 + 4 * d)
        ]
        threshold = rng.randint(5, 20)
        steps = [f"keep rows with units >= {threshold}"]
        if d >= 2:
            steps.append("add a column revenue = units * price")
        if d >= 3:
            steps.append("group by region and sum units and revenue (columns: region, units, revenue)")
        if d >= 4:
            steps.append("sort by revenue descending (ties: region ascending) and keep the top 2 rows")
        result = self._apply(rows, threshold, d)
        if not result:
            threshold = 1
            steps[0] = "keep rows with units >= 1"
            result = self._apply(rows, threshold, d)
        csv = "id,region,product,units,price\n" + "\n".join(
            f"{r['id']},{r['region']},{r['product']},{r['units']},{r['price']}" for r in rows
        )
        prompt = f"Table (CSV):\n{csv}\n\nApply, in order:\n" + "\n".join(
            f"{i + 1}. {s}" for i, s in enumerate(steps)
        )
        state = {"rows": rows, "threshold": threshold, "steps": steps, "answer": result}
        fmt = (
            "Finish with `Answer: [{...}, ...]` (a JSON list of row objects with the resulting columns, "
            "rows in table order unless a sort is asked for)."
        )
        return self._task(seed, d, prompt, state, fmt, tools=[])

    @staticmethod
    def _apply(rows: list[dict], threshold: int, d: int) -> list[dict]:
        out = [dict(r) for r in rows if r["units"] >= threshold]
        if d >= 2:
            for r in out:
                r["revenue"] = r["units"] * r["price"]
        if d >= 3:
            groups: dict[str, dict] = {}
            for r in out:
                g = groups.setdefault(r["region"], {"region": r["region"], "units": 0, "revenue": 0})
                g["units"] += r["units"]
                g["revenue"] += r["revenue"]
            out = sorted(groups.values(), key=lambda g: g["region"])
        if d >= 4:
            out = sorted(out, key=lambda g: (-g["revenue"], g["region"]))[:2]
        return out

    def solve(self, task: Task) -> Any:
        return [dict(r) for r in task.state["answer"]]

    def verify(self, task: Task, answer: Any, trace: list[ToolCallRecord] | None = None) -> Score:
        want = task.state["answer"]
        if not isinstance(answer, list) or not all(isinstance(r, dict) for r in answer):
            return Score.fail("expected a JSON list of row objects")
        if len(answer) != len(want):
            return Score.fail(f"expected {len(want)} rows, got {len(answer)}")
        ordered = task.state["steps"][-1].startswith("sort") or len(task.state["steps"]) < 3
        got = answer if ordered else sorted(answer, key=lambda r: str(r.get("region")))
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            if set(g) != set(w):
                return Score.fail(f"row {i + 1}: columns {sorted(g)} != {sorted(w)}")
            for k, v in w.items():
                if g[k] != v and str(g[k]) != str(v):
                    return Score.fail(f"row {i + 1}: {k} is {g[k]!r}, expected a different value")
        return Score.ok()

    def perturb(self, task: Task, answer: Any, rng: random.Random) -> list[Any]:
        out: list[Any] = [answer[:-1]]
        if answer:
            bad = [dict(r) for r in answer]
            key = "revenue" if "revenue" in bad[0] else "units"
            bad[0][key] += 1
            out.append(bad)
            out.append([{k: v for k, v in r.items() if k != key} for r in answer])
        if len(answer) > 1 and answer[0] != answer[-1] and task.state["steps"][-1].startswith("sort"):
            out.append(answer[::-1])
        return [o for o in out if o != answer]


_UNITS = {
    "length": {"mm": Fraction(1, 1000), "cm": Fraction(1, 100), "m": Fraction(1), "km": Fraction(1000),
               "inch": Fraction(254, 10000), "foot": Fraction(3048, 10000), "yard": Fraction(9144, 10000),
               "mile": Fraction(1609344, 1000)},
    "mass": {"g": Fraction(1, 1000), "kg": Fraction(1), "tonne": Fraction(1000), "ounce": Fraction(28349523125, 10**12),
             "pound": Fraction(45359237, 10**8)},
    "volume": {"ml": Fraction(1, 1000), "l": Fraction(1), "cup": Fraction(236588, 10**6),
               "gallon": Fraction(3785411784, 10**9)},
}  # fmt: skip


@register
class UnitConversionEnv(Environment):
    name = "unit_conversion"
    domain = "maths"
    description = "Exact unit-conversion chains (international units: 1 inch = 2.54 cm exactly, etc.)."
    difficulty_knobs = "number of quantities to add = difficulty; quantity precision grows"

    def generate(self, seed: int, difficulty: int = DEFAULT_DIFFICULTY) -> Task:
        d = self._check_difficulty(difficulty)
        rng = self._rng(seed, d)
        dim = rng.choice(sorted(_UNITS))
        units = _UNITS[dim]
        parts = []
        total = Fraction(0)
        for _ in range(d + 1):
            u = rng.choice(sorted(units))
            q = Fraction(rng.randint(1, 10 ** (1 + d // 2)), rng.choice([1, 2, 4, 5, 10]))
            parts.append((q, u))
            total += q * units[u]
        target = rng.choice(sorted(units))
        answer = total / units[target]
        terms = " + ".join(f"{float(q):g} {u}" for q, u in parts)
        defs = ", ".join(
            f"1 {u} = {float(v):g} {'m' if dim == 'length' else 'kg' if dim == 'mass' else 'l'}"
            for u, v in sorted(units.items())
        )
        prompt = f"Exact conversion factors: {defs}.\nExpress {terms} in {target}, exactly."
        return self._task(
            seed, d, prompt, {"answer": f"{answer.numerator}/{answer.denominator}"}, _EXACT_FORMAT, tools=[]
        )

    def solve(self, task: Task) -> Any:
        return task.state["answer"]

    def verify(self, task: Task, answer: Any, trace: list[ToolCallRecord] | None = None) -> Score:
        return _verify_exact(task, answer)

    def perturb(self, task: Task, answer: Any, rng: random.Random) -> list[Any]:
        return _perturb_exact(answer)


@register
class LedgerEnv(Environment):
    name = "ledger"
    domain = "finance"
    description = (
        "Replay bank transactions (deposits, withdrawals with overdraft rules, transfers, fees, interest)."
    )
    difficulty_knobs = (
        "accounts = 1 + difficulty; transactions = 4 + 4*difficulty; rules added from difficulty 3"
    )

    def generate(self, seed: int, difficulty: int = DEFAULT_DIFFICULTY) -> Task:
        d = self._check_difficulty(difficulty)
        rng = self._rng(seed, d)
        accounts = [f"ACC-{rng.randint(100, 999)}-{i}" for i in range(1 + d)]
        opening = {a: rng.randint(0, 500) for a in accounts}
        txs: list[list] = []
        for _ in range(4 + 4 * d):
            kind = rng.choice(
                ["deposit", "withdraw", "transfer"] if len(accounts) > 1 else ["deposit", "withdraw"]
            )
            a = rng.choice(accounts)
            amt = rng.randint(5, 300)
            if kind == "transfer":
                txs.append([kind, a, rng.choice([x for x in accounts if x != a]), amt])
            else:
                txs.append([kind, a, amt])
        if d >= 3:
            txs.append(["interest", rng.choice(accounts), rng.choice([1, 2, 5])])
        rules = [
            "A withdrawal or transfer that would make the paying account negative is rejected (no change) "
            "and costs that account a 5 fee, which is applied even if it makes the balance negative."
        ]
        if d >= 3:
            rules.append(
                "Interest adds p percent of the current balance if positive, rounded down to a whole unit."
            )
        final = self._replay(opening, txs)
        target = rng.choice(accounts)
        lines = [" ".join(str(x) for x in t) for t in txs]
        prompt = (
            "Opening balances: "
            + ", ".join(f"{a}: {v}" for a, v in opening.items())
            + ".\nRules: "
            + " ".join(rules)
            + "\nTransactions, in order:\n"
            + "\n".join(lines)
            + f"\nWhat is the final balance of {target}?"
        )
        state = {
            "opening": opening,
            "transactions": txs,
            "target": target,
            "answer": str(final[target]),
            "final": final,
        }
        return self._task(seed, d, prompt, state, _EXACT_FORMAT, tools=[])

    @staticmethod
    def _replay(opening: dict[str, int], txs: list[list]) -> dict[str, int]:
        bal = dict(opening)
        for t in txs:
            if t[0] == "deposit":
                bal[t[1]] += t[2]
            elif t[0] == "withdraw" or t[0] == "transfer":
                amt = t[-1]
                if bal[t[1]] - amt < 0:
                    bal[t[1]] -= 5
                else:
                    bal[t[1]] -= amt
                    if t[0] == "transfer":
                        bal[t[2]] += amt
            elif t[0] == "interest" and bal[t[1]] > 0:
                bal[t[1]] += bal[t[1]] * t[2] // 100
        return bal

    def solve(self, task: Task) -> Any:
        return int(task.state["answer"])

    def verify(self, task: Task, answer: Any, trace: list[ToolCallRecord] | None = None) -> Score:
        return _verify_exact(task, answer)

    def perturb(self, task: Task, answer: Any, rng: random.Random) -> list[Any]:
        # The classic mistake: forgetting the rejection rule (apply every transaction blindly).
        naive = dict(task.state["opening"])
        for t in task.state["transactions"]:
            if t[0] == "deposit":
                naive[t[1]] += t[2]
            elif t[0] in ("withdraw", "transfer"):
                naive[t[1]] -= t[-1]
                if t[0] == "transfer":
                    naive[t[2]] += t[-1]
        extra = [str(naive[task.state["target"]])] if naive[task.state["target"]] != int(answer) else []
        return _perturb_exact(answer) + extra
