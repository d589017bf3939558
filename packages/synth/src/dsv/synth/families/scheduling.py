"""Scheduling: meetings across calendars, and jobs on machines with dependencies and deadlines.

Meeting: find the earliest slot of a given length when every required person is
free (calendars come from a tool). Jobs: order jobs with durations, prerequisites
and deadlines on one machine so that every deadline is met. Verifiers check the
constraints directly; the meeting answer must also be the earliest slot so that a
valid-but-lazy answer does not pass.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from dsv.synth.env import DEFAULT_DIFFICULTY, Environment, Score, Task, ToolCallRecord
from dsv.synth.registry import register

__all__ = ["JobScheduleEnv", "MeetingEnv"]

_PEOPLE = ["Ari", "Bea", "Cy", "Dot", "Eun", "Fitz", "Gia", "Hux", "Ila", "Jem"]
_DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri"]


def _hm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def _parse_hm(text: Any) -> int:
    if not isinstance(text, str) or ":" not in text:
        raise ValueError(f"time must be 'HH:MM', got {text!r}")
    h, m = text.strip().split(":", 1)
    value = int(h) * 60 + int(m)
    if not (0 <= int(m) < 60 and 0 <= value < 24 * 60):
        raise ValueError(f"bad time {text!r}")
    return value


@register
class MeetingEnv(Environment):
    name = "meeting"
    domain = "planning"
    description = "Find the earliest common free slot for a meeting across several busy calendars."
    difficulty_knobs = (
        "attendees = 2 + difficulty; busy blocks per person and days searched grow with difficulty"
    )

    def generate(self, seed: int, difficulty: int = DEFAULT_DIFFICULTY) -> Task:
        d = self._check_difficulty(difficulty)
        rng = self._rng(seed, d)
        people = rng.sample(_PEOPLE, 2 + d)
        days = _DAYS[: min(5, 1 + d)]
        # Seven lengths: the day's last free slot (a common answer) then starts at seven times.
        length = rng.choice([30, 45, 60, 75, 90, 105, 120])
        calendars: dict[str, dict[str, list[list[int]]]] = {}
        away = {day: rng.choice(people) for day in days if rng.random() < 0.35}
        for p in people:
            calendars[p] = {}
            for day in days:
                if away.get(day) == p:  # out of office all day
                    calendars[p][day] = [[9 * 60, 18 * 60]]
                    continue
                # Someone is always busy first thing, for a random while, so the answer is not 09:00.
                blocks = (
                    [[9 * 60, 9 * 60 + rng.randrange(30, 240, 15)]]
                    if p == people[days.index(day) % len(people)]
                    else []
                )
                for _ in range(rng.randint(1, 2 + d)):
                    start = rng.randrange(9 * 60, 17 * 60, 15)
                    blocks.append([start, min(18 * 60, start + rng.choice([30, 45, 60, 90, 120]))])
                calendars[p][day] = sorted(blocks)
        state = {
            "people": people,
            "days": days,
            "length": length,
            "calendars": calendars,
            "window": [540, 1080],
        }
        if self._earliest(state) is None:
            # Open one slot at a random day and time. (Clearing the last morning instead made "last
            # day, 09:00" the answer of a fifth of the tasks: a constant answer passed them.)
            # Busy blocks are trimmed, not dropped, so the first-thing block still rules out 09:00.
            day = rng.choice(days)
            start = rng.randrange(9 * 60 + 15, 18 * 60 - length + 1, 15)
            end = start + length
            for p in people:
                kept = []
                for s0, e0 in calendars[p][day]:
                    kept += [[s0, e0]] if e0 <= start or s0 >= end else [b for b in ([s0, start], [end, e0]) if b[0] < b[1]]
                calendars[p][day] = kept
        prompt = (
            f"Schedule a {length}-minute meeting with {', '.join(people)} on one of {', '.join(days)} between "
            f"09:00 and 18:00. Find the EARLIEST slot (earliest day, then earliest start time, on a 15-minute grid) "
            f"when everyone is free. Use get_calendar to see each person's busy times."
        )
        fmt = 'Finish with `Answer: {"day": "<Mon..Fri>", "start": "HH:MM"}` (JSON).'
        return self._task(seed, d, prompt, state, fmt)

    @staticmethod
    def _free(state: dict, day: str, start: int) -> bool:
        end = start + state["length"]
        if start < state["window"][0] or end > state["window"][1]:
            return False
        return all(
            not (s < end and start < e) for p in state["people"] for s, e in state["calendars"][p][day]
        )

    def _earliest(self, state: dict) -> dict | None:
        for day in state["days"]:
            for start in range(state["window"][0], state["window"][1], 15):
                if self._free(state, day, start):
                    return {"day": day, "start": _hm(start)}
        return None

    def tools(self, task: Task) -> list[Callable[..., Any]]:
        cal = task.state["calendars"]

        def get_calendar(person: str, day: str) -> str:
            """Busy intervals (start, end as HH:MM) of one person on one weekday.

            Args:
                person: the person's name.
                day: weekday, e.g. Mon.
            """
            if person not in cal:
                return f"error: unknown person {person!r}"
            if day not in cal[person]:
                return f"error: no calendar for {day!r}; days: {sorted(cal[person])}"
            return json.dumps([[_hm(s), _hm(e)] for s, e in cal[person][day]])

        return [get_calendar]

    def solve(self, task: Task) -> Any:
        return self._earliest(task.state)

    def verify(self, task: Task, answer: Any, trace: list[ToolCallRecord] | None = None) -> Score:
        if not isinstance(answer, dict):
            return Score.fail('expected {"day": ..., "start": "HH:MM"}')
        day = answer.get("day")
        if day not in task.state["days"]:
            return Score.fail(f"day must be one of {task.state['days']}")
        try:
            start = _parse_hm(answer.get("start"))
        except ValueError as exc:
            return Score.fail(str(exc))
        if not self._free(task.state, day, start):
            return Score.fail(f"someone is busy at {day} {_hm(start)} or the slot leaves 09:00-18:00")
        if self._earliest(task.state) != {"day": day, "start": _hm(start)}:
            return Score.fail("the slot works but is not the earliest one")
        return Score.ok()

    def perturb(self, task: Task, answer: Any, rng: random.Random) -> list[Any]:
        start = _parse_hm(answer["start"])
        later_day = task.state["days"][-1]
        return [
            {**answer, "start": _hm(start - 15)},
            {**answer, "start": _hm(start + 15)},
            {**answer, "start": _hm(start + 60)},
            {
                "day": later_day if later_day != answer["day"] else task.state["days"][0],
                "start": answer["start"],
            },
        ]


@register
class JobScheduleEnv(Environment):
    name = "job_schedule"
    domain = "planning"
    description = "Order jobs on one machine respecting prerequisites so every job finishes by its deadline."
    difficulty_knobs = "jobs = 3 + 2*difficulty; more prerequisites and tighter deadlines as difficulty grows"

    def generate(self, seed: int, difficulty: int = DEFAULT_DIFFICULTY) -> Task:
        d = self._check_difficulty(difficulty)
        rng = self._rng(seed, d)
        n = 3 + 2 * d
        names = [f"J{i + 1}" for i in range(n)]
        order = list(names)
        rng.shuffle(order)
        durations = {j: rng.randint(1, 9) for j in names}
        prereq: dict[str, list[str]] = {j: [] for j in names}
        for i, j in enumerate(order):
            for k in order[:i]:
                if rng.random() < 0.12 * d / max(1, i) * 2:
                    prereq[j].append(k)
        finish, t = {}, 0
        for j in order:
            t += durations[j]
            finish[j] = t
        # Deadlines: the planted order meets them with a slack that shrinks with difficulty.
        deadlines = {j: finish[j] + rng.randint(0, max(1, 8 - 2 * d)) for j in names}
        state = {"durations": durations, "prereq": prereq, "deadlines": deadlines, "planted": order}
        lines = [
            f"{j}: takes {durations[j]}h, due by hour {deadlines[j]}"
            + (f", after {', '.join(sorted(prereq[j]))}" if prereq[j] else "")
            for j in names
        ]
        prompt = (
            "One machine runs one job at a time, starting at hour 0, with no idle time. Jobs:\n"
            + "\n".join(lines)
            + "\nGive an order in which every job finishes by its deadline and runs after its prerequisites."
        )
        fmt = 'Finish with `Answer: ["J..", "J..", ...]` (JSON list of every job in run order).'
        return self._task(seed, d, prompt, state, fmt, tools=[])

    def solve(self, task: Task) -> Any:
        # Earliest-deadline-first among jobs whose prerequisites are done; fall back to the planted order.
        st = task.state
        done: list[str] = []
        remaining = set(st["durations"])
        while remaining:
            ready = [j for j in remaining if all(p in done for p in st["prereq"][j])]
            j = min(ready, key=lambda x: (st["deadlines"][x], x))
            done.append(j)
            remaining.remove(j)
        return done if self.verify(task, done).passed else list(st["planted"])

    def verify(self, task: Task, answer: Any, trace: list[ToolCallRecord] | None = None) -> Score:
        st = task.state
        if not isinstance(answer, list) or sorted(map(str, answer)) != sorted(st["durations"]):
            return Score.fail("expected a JSON list naming every job exactly once")
        t, seen = 0, set()
        for j in answer:
            missing = [p for p in st["prereq"][j] if p not in seen]
            if missing:
                return Score.fail(f"{j} runs before its prerequisite(s) {missing}")
            t += st["durations"][j]
            if t > st["deadlines"][j]:
                return Score.fail(f"{j} finishes at hour {t}, after its deadline {st['deadlines'][j]}")
            seen.add(j)
        return Score.ok()

    def perturb(self, task: Task, answer: Any, rng: random.Random) -> list[Any]:
        return [list(reversed(answer)), answer[:-1], [*answer[1:], answer[0]], [*answer, answer[0]]]
