"""SQL questions over a generated SQLite shop database, answered with a read-only query tool.

The database (customers, products, orders) is generated per seed and stored in
the task state as rows, so it is rebuilt identically in memory for the tools and
the verifier. Each question comes with a gold query; the answer is the value (or
the sorted list of names) that query returns. Difficulty adds joins, grouping,
date filters and HAVING clauses.
"""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import Callable
from typing import Any

from dsv.synth.env import DEFAULT_DIFFICULTY, Environment, Score, Task, ToolCallRecord
from dsv.synth.families.maths import parse_exact
from dsv.synth.registry import register

__all__ = ["SqlEnv"]

_FIRST = [
    "Ana",
    "Ben",
    "Cleo",
    "Dev",
    "Eli",
    "Fay",
    "Gus",
    "Hal",
    "Ines",
    "Jo",
    "Kit",
    "Lou",
    "Mo",
    "Nia",
    "Oz",
]
_LAST = ["Reyes", "Stone", "Tran", "Underwood", "Vance", "Wolfe", "Xu", "Young", "Zamora", "Quill"]
_CITIES = ["Porto", "Lyon", "Graz", "Turku", "Split", "Ghent", "Bergen", "Cork"]
_CATEGORIES = ["books", "garden", "toys", "kitchen", "music", "sports"]
_SCHEMA = """
CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, city TEXT, joined TEXT);
CREATE TABLE products (id INTEGER PRIMARY KEY, title TEXT, category TEXT, price INTEGER);
CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, product_id INTEGER, quantity INTEGER, day TEXT);
"""


def _connect(state: dict) -> sqlite3.Connection:
    con = sqlite3.connect(":memory:")
    con.executescript(_SCHEMA)
    for table in ("customers", "products", "orders"):
        rows = state["db"][table]
        if rows:
            con.executemany(f"INSERT INTO {table} VALUES ({','.join('?' * len(rows[0]))})", rows)
    con.commit()
    return con


def _run(state: dict, sql: str) -> list[tuple]:
    con = _connect(state)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


@register
class SqlEnv(Environment):
    name = "sql"
    domain = "data"
    description = "Answer a business question about a generated SQLite shop database using a SQL query tool."
    difficulty_knobs = "rows grow with difficulty; 1: one table, 2: joins, 3+: grouping/dates, 5: HAVING"

    def generate(self, seed: int, difficulty: int = DEFAULT_DIFFICULTY) -> Task:
        d = self._check_difficulty(difficulty)
        rng = self._rng(seed, d)
        for _attempt in range(50):
            n_c, n_p, n_o = 8 + 4 * d, 6 + 2 * d, 30 + 20 * d
            names = rng.sample([f"{f} {s}" for f in _FIRST for s in _LAST], n_c)
            customers = [
                [
                    i + 1,
                    names[i],
                    rng.choice(_CITIES),
                    f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                ]
                for i in range(n_c)
            ]
            products = [
                [i + 1, f"Item-{rng.randint(100, 999)}", rng.choice(_CATEGORIES), rng.randint(3, 120)]
                for i in range(n_p)
            ]
            orders = [
                [
                    i + 1,
                    rng.randint(1, n_c),
                    rng.randint(1, n_p),
                    rng.randint(1, 5),
                    f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                ]
                for i in range(n_o)
            ]
            state: dict[str, Any] = {"db": {"customers": customers, "products": products, "orders": orders}}
            question, sql, kind = self._question(rng, d)
            rows = _run(state, sql)
            answer = self._normalise_rows(rows, kind)
            if answer in (None, [], 0, "0"):
                continue  # trivial answers would pass; draw another question/database
            state.update({"question": question, "gold_sql": sql, "kind": kind, "answer": answer})
            prompt = (
                f"A shop keeps its data in SQLite with tables customers(id, name, city, joined), "
                f"products(id, title, category, price), orders(id, customer_id, product_id, quantity, day). "
                f"Dates are 'YYYY-MM-DD' text; an order's amount is quantity * price.\n\nQuestion: {question}"
            )
            fmt = (
                "Finish with `Answer: <number>`."
                if kind == "number"
                else 'Finish with `Answer: ["name", ...]` (a JSON list of names, sorted alphabetically).'
            )
            return self._task(seed, d, prompt, state, fmt)
        raise AssertionError("sql generator could not find a question with a non-trivial answer")

    def _question(self, rng: random.Random, d: int) -> tuple[str, str, str]:
        city, cat = rng.choice(_CITIES), rng.choice(_CATEGORIES)
        month = rng.randint(1, 12)
        amount = "o.quantity * p.price"
        options: list[tuple[str, str, str]] = [
            (
                f"How many customers live in {city}?",
                f"SELECT COUNT(*) FROM customers WHERE city = '{city}'",
                "number",
            ),
            (
                f"What is the highest price of a product in the {cat} category?",
                f"SELECT MAX(price) FROM products WHERE category = '{cat}'",
                "number",
            ),
        ]
        if d >= 2:
            options = [
                (
                    f"What is the total amount spent on {cat} products by customers from {city}?",
                    f"SELECT SUM({amount}) FROM orders o JOIN products p ON p.id = o.product_id "
                    f"JOIN customers c ON c.id = o.customer_id WHERE p.category = '{cat}' AND c.city = '{city}'",
                    "number",
                ),
                (
                    f"Which customers from {city} ordered at least one {cat} product?",
                    f"SELECT DISTINCT c.name FROM orders o JOIN products p ON p.id = o.product_id "
                    f"JOIN customers c ON c.id = o.customer_id WHERE p.category = '{cat}' AND c.city = '{city}'",
                    "names",
                ),
                (
                    f"How many units of {cat} products were ordered in total?",
                    f"SELECT SUM(o.quantity) FROM orders o JOIN products p ON p.id = o.product_id "
                    f"WHERE p.category = '{cat}'",
                    "number",
                ),
            ]
        if d >= 3:
            options += [
                (
                    f"Which customer spent the most in month {month} of 2025 (by total amount)? "
                    f"If several tie, list them all.",
                    f"WITH t AS (SELECT c.name AS name, SUM({amount}) AS s FROM orders o "
                    f"JOIN products p ON p.id = o.product_id JOIN customers c ON c.id = o.customer_id "
                    f"WHERE substr(o.day, 6, 2) = '{month:02d}' GROUP BY c.id) "
                    f"SELECT name FROM t WHERE s = (SELECT MAX(s) FROM t)",
                    "names",
                ),
                (
                    "Which customers have never placed an order?",
                    "SELECT name FROM customers WHERE id NOT IN (SELECT customer_id FROM orders)",
                    "names",
                ),
            ]
        if d >= 5:
            k = rng.randint(2, 4)
            options.append(
                (
                    f"Which cities have at least {k} different customers who ordered {cat} products?",
                    f"SELECT c.city FROM orders o JOIN products p ON p.id = o.product_id "
                    f"JOIN customers c ON c.id = o.customer_id WHERE p.category = '{cat}' "
                    f"GROUP BY c.city HAVING COUNT(DISTINCT c.id) >= {k}",
                    "names",
                )
            )
        return rng.choice(options)

    @staticmethod
    def _normalise_rows(rows: list[tuple], kind: str) -> Any:
        if kind == "number":
            value = rows[0][0] if rows else None
            return None if value is None else int(value)
        return sorted({str(r[0]) for r in rows})

    def tools(self, task: Task) -> list[Callable[..., Any]]:
        state = task.state

        def run_sql(query: str) -> str:
            """Run one read-only SQL query on the shop database and return up to 50 rows as JSON.

            Args:
                query: a single SELECT (or WITH ... SELECT) statement.
            """
            head = query.strip().lower()
            if not (head.startswith("select") or head.startswith("with")):
                return "error: only SELECT queries are allowed"
            con = _connect(state)
            try:
                con.execute("PRAGMA query_only = ON")
                cur = con.execute(query)
                cols = [c[0] for c in cur.description or []]
                rows = cur.fetchmany(51)
            except sqlite3.Error as exc:
                return f"error: {exc}"
            finally:
                con.close()
            more = len(rows) > 50
            return json.dumps({"columns": cols, "rows": [list(r) for r in rows[:50]], "truncated": more})

        return [run_sql]

    def solve(self, task: Task) -> Any:
        return task.state["answer"]

    def verify(self, task: Task, answer: Any, trace: list[ToolCallRecord] | None = None) -> Score:
        want = task.state["answer"]
        if task.state["kind"] == "number":
            try:
                got = parse_exact(answer)
            except (ValueError, ZeroDivisionError) as exc:
                return Score.fail(f"expected a number: {exc}")
            return Score.ok() if got == want else Score.fail(f"wrong value {answer}")
        if isinstance(answer, str):
            answer = [answer]
        if not isinstance(answer, list) or not all(isinstance(x, str) for x in answer):
            return Score.fail("expected a JSON list of names")
        got_names = sorted({x.strip() for x in answer})
        if got_names == want:
            return Score.ok()
        missing, extra = sorted(set(want) - set(got_names)), sorted(set(got_names) - set(want))
        return Score.fail(f"{len(missing)} missing and {len(extra)} unexpected name(s)")

    def perturb(self, task: Task, answer: Any, rng: random.Random) -> list[Any]:
        if task.state["kind"] == "number":
            return [answer + 1, answer - 1, answer * 2, 0]
        everyone = sorted(
            {r[1] for r in task.state["db"]["customers"]} | {r[2] for r in task.state["db"]["customers"]}
        )
        extra = next(x for x in everyone if x not in answer)
        out = [[*answer, extra]]
        if len(answer) > 1:
            out.append(answer[1:])
        out.append(sorted(set(answer) - {answer[0]} | {extra}))
        return [o for o in out if sorted(o) != answer]
