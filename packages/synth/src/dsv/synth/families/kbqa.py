"""Multi-hop question answering over a generated long-tail knowledge base, with search tools.

Every seed invents a small world of people, towns, companies and rivers whose facts
cannot be known in advance; each entity has a short document. A question chains
`hops` relations ("the river through the town where the founder of X was born"),
so it needs several searches. The answer is one entity name.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from dsv.synth.env import DEFAULT_DIFFICULTY, Environment, Score, Task, ToolCallRecord
from dsv.synth.registry import register

__all__ = ["KbQaEnv"]

_SYL = [
    "ka",
    "lo",
    "mir",
    "ven",
    "dra",
    "sel",
    "tor",
    "bi",
    "nu",
    "quo",
    "ran",
    "fel",
    "os",
    "par",
    "zen",
    "hul",
]


def _word(rng: random.Random, parts: int) -> str:
    return "".join(rng.choice(_SYL) for _ in range(parts)).capitalize()


@register
class KbQaEnv(Environment):
    name = "kb_qa"
    domain = "search"
    description = "Multi-hop questions over an invented knowledge base, answered with search/read tools."
    difficulty_knobs = "hops = 1 + difficulty (2..6); knowledge base size grows with difficulty"

    def generate(self, seed: int, difficulty: int = DEFAULT_DIFFICULTY) -> Task:
        d = self._check_difficulty(difficulty)
        rng = self._rng(seed, d)
        used: set[str] = set()

        def fresh(parts: int, suffix: str = "") -> str:
            while True:
                w = _word(rng, parts) + suffix
                if w not in used:
                    used.add(w)
                    return w

        rivers = [fresh(2, " River") for _ in range(3 + d)]
        towns = [fresh(3) for _ in range(6 + 2 * d)]
        people = [f"{fresh(2)} {fresh(2)}" for _ in range(8 + 3 * d)]
        companies = [fresh(2, " Works") for _ in range(5 + 2 * d)]
        facts: dict[str, dict[str, str]] = {}
        for t in towns:
            facts[t] = {
                "type": "town",
                "river": rng.choice(rivers),
                "twin": rng.choice([x for x in towns if x != t]),
            }
        for r in rivers:
            facts[r] = {"type": "river", "source": rng.choice(towns)}
        for p in people:
            facts[p] = {
                "type": "person",
                "born_in": rng.choice(towns),
                "mentor": rng.choice([x for x in people if x != p]),
            }
        for c in companies:
            facts[c] = {"type": "company", "founder": rng.choice(people), "based_in": rng.choice(towns)}
        relations = {
            "town": [("river", "the river that flows through {}"), ("twin", "the twin town of {}")],
            "river": [("source", "the town where {} has its source")],
            "person": [("born_in", "the birthplace of {}"), ("mentor", "the mentor of {}")],
            "company": [("founder", "the founder of {}"), ("based_in", "the town where {} is based")],
        }
        hops = 1 + d
        start = rng.choice(companies + people)
        phrase, cur, path = start, start, [start]
        for _ in range(hops):
            rel, template = rng.choice(relations[facts[cur]["type"]])
            cur = facts[cur][rel]
            phrase = template.format(phrase)
            path.append(cur)
        docs = {name: self._doc(name, f) for name, f in facts.items()}
        state = {"docs": docs, "answer": cur, "path": path, "entities": sorted(facts)}
        prompt = (
            f"Use the encyclopedia tools to answer: what is {phrase}? "
            f"(Every name here belongs to a small fictional world; do not guess, look it up.)"
        )
        return self._task(seed, d, prompt, state, "Finish with one line `Answer: <name>`.")

    @staticmethod
    def _doc(name: str, f: dict[str, str]) -> str:
        kind = f["type"]
        if kind == "town":
            return f"{name} is a town on the {f['river']}. It is twinned with {f['twin']}."
        if kind == "river":
            return f"The {name} rises near the town of {f['source']}."
        if kind == "person":
            return f"{name} was born in {f['born_in']}. {name} trained under {f['mentor']}."
        return f"{name} was founded by {f['founder']} and is based in {f['based_in']}."

    def tools(self, task: Task) -> list[Callable[..., Any]]:
        docs: dict[str, str] = task.state["docs"]

        def search(query: str) -> str:
            """Search the encyclopedia; returns up to 5 titles whose title or text contains all query words.

            Args:
                query: words to look for (case-insensitive).
            """
            words = [w for w in query.lower().split() if w]
            if not words:
                return "error: empty query"
            hits = [t for t, text in docs.items() if all(w in (t + " " + text).lower() for w in words)]
            # Title matches first: the entity itself is usually what the model wants.
            hits.sort(key=lambda t: (not all(w in t.lower() for w in words), t))
            return json.dumps(hits[:5])

        def read(title: str) -> str:
            """Read the encyclopedia article with this exact title.

            Args:
                title: an article title returned by search.
            """
            if title not in docs:
                return f"error: no article titled {title!r}; use search to find titles"
            return docs[title]

        return [search, read]

    def solve(self, task: Task) -> Any:
        return task.state["answer"]

    def verify(self, task: Task, answer: Any, trace: list[ToolCallRecord] | None = None) -> Score:
        if not isinstance(answer, str):
            return Score.fail(f"expected a name, got {type(answer).__name__}")
        got = " ".join(answer.strip().strip(".").split()).lower()
        want = task.state["answer"].lower()
        if got == want or got == "the " + want:
            return Score.ok()
        return Score.fail(f"{answer!r} is not the answer")

    def perturb(self, task: Task, answer: Any, rng: random.Random) -> list[Any]:
        others = [p for p in task.state["path"][:-1] if p != answer]
        same_kind = [e for e in task.state["entities"] if e != answer and e.endswith(answer.split()[-1])][:3]
        return [*others, *same_kind]
