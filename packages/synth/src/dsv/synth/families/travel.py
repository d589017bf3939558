"""Multi-day travel itinerary under constraints, with search and quote tools.

The world: cities with hotels whose nightly price moves with the weekday and the
hotel, and attractions with opening days and hours. The traveller must visit a
given set of cities (each once, no returning), stay a given number of nights in
total, see the required attractions on days they are open and in the city, and
keep the total hotel bill within a budget set just above the cheapest feasible
plan. Prices are only visible through the tools, so the model has to search.

Answer: {"stays": [{"city", "hotel", "nights"}...], "visits": [{"attraction", "day", "hour"}...]}.
Days are numbered from 1; on day k the traveller sleeps in the city that covers night k.
The verifier recomputes the bill from the hidden price table, so any plan meeting
every constraint passes (there is usually more than one).
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable
from typing import Any

from dsv.synth.env import DEFAULT_DIFFICULTY, Environment, Score, Task, ToolCallRecord
from dsv.synth.registry import register

__all__ = ["TravelEnv"]

_CITIES = [
    "Aldmere",
    "Brisa",
    "Corvel",
    "Dunhollow",
    "Estara",
    "Falkreach",
    "Galen",
    "Harrow",
    "Isola",
    "Jorvik",
]
_HOTEL_WORDS = ["Grand", "Harbour", "Lantern", "Meadow", "Crown", "Station", "Garden", "Summit"]
_SIGHTS = ["Museum", "Cathedral", "Gardens", "Castle", "Aquarium", "Gallery", "Observatory", "Market"]
_DAYS = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]


def _compositions(total: int, parts: int) -> list[tuple[int, ...]]:
    return [
        tuple(b - a for a, b in zip((0, *cuts), (*cuts, total), strict=True))
        for cuts in itertools.combinations(range(1, total), parts - 1)
    ]


@register
class TravelEnv(Environment):
    name = "travel"
    domain = "planning"
    description = (
        "Plan a multi-city trip: no repeated cities, attractions on open days, hotel bill within budget."
    )
    difficulty_knobs = (
        "cities to visit = 1 + difficulty//1 capped at 5; nights = cities + difficulty; budget slack shrinks"
    )

    def generate(self, seed: int, difficulty: int = DEFAULT_DIFFICULTY) -> Task:
        d = self._check_difficulty(difficulty)
        rng = self._rng(seed, d)
        world_cities = rng.sample(_CITIES, min(len(_CITIES), 4 + d))
        hotels: dict[str, dict[str, list[int]]] = {}
        attractions: dict[str, list[dict]] = {}
        for city in world_cities:
            hotels[city] = {}
            for word in rng.sample(_HOTEL_WORDS, 2 + min(d, 3)):
                base = rng.randint(60, 220)
                surge = [1.0, 1.0, 1.0, 1.1, 1.35, 1.5, 1.2]
                hotels[city][f"{word} {city}"] = [
                    int(base * surge[k] * rng.uniform(0.85, 1.15)) for k in range(7)
                ]
            attractions[city] = []
            for sight in rng.sample(_SIGHTS, 2):
                open_days = sorted(rng.sample(range(7), rng.randint(2, 5)))
                start = rng.randint(8, 12)
                attractions[city].append(
                    {
                        "name": f"{city} {sight}",
                        "open_days": open_days,
                        "hours": [start, start + rng.randint(3, 8)],
                    }
                )
        n_visit = min(5, 1 + d)
        to_visit = rng.sample(world_cities, n_visit)
        nights = n_visit + d
        start_day = rng.randrange(7)
        required = [
            rng.choice(attractions[c])["name"] for c in rng.sample(to_visit, min(n_visit, 1 + d // 2))
        ]
        state = {
            "hotels": hotels,
            "attractions": attractions,
            "cities": to_visit,
            "nights": nights,
            "start_weekday": start_day,
            "required": required,
        }
        best = self._cheapest(state)
        assert best is not None
        cost, _ = best
        state["budget"] = int(cost * (1.0 + 0.12 / d)) + 1
        prompt = (
            f"Plan a trip of {nights} nights starting on a {_DAYS[start_day]} (day 1). Visit each of these cities "
            f"exactly once, in any order, staying at least one night in each: {', '.join(sorted(to_visit))}. "
            f"Do not return to a city you have left. Each stay uses one hotel for all its nights. "
            f"You must visit {', '.join(required)}, each on a day you are in its city, at an hour it is open. "
            f"The total hotel bill must not exceed {state['budget']}. Use the tools to look up hotels, prices "
            f"(prices change by night) and opening times."
        )
        fmt = (
            'Finish with `Answer: {"stays": [{"city": ..., "hotel": ..., "nights": n}, ...], '
            '"visits": [{"attraction": ..., "day": k, "hour": h}, ...]}` (JSON, stays in travel order).'
        )
        return self._task(seed, d, prompt, state, fmt)

    # ---- world helpers -------------------------------------------------------------------------
    @staticmethod
    def _price(state: dict, city: str, hotel: str, night: int) -> int:
        """Price of `hotel` for trip night `night` (1-based)."""
        return state["hotels"][city][hotel][(state["start_weekday"] + night - 1) % 7]

    def _cheapest(self, state: dict) -> tuple[int, dict] | None:
        best: tuple[int, dict] | None = None
        cities, nights = state["cities"], state["nights"]
        where = {a["name"]: (c, a) for c, lst in state["attractions"].items() for a in lst}
        for order in itertools.permutations(cities):
            for split in _compositions(nights, len(cities)):
                night = 1
                stays, visits, total, ok = [], [], 0, True
                for city, n in zip(order, split, strict=True):
                    nights_here = list(range(night, night + n))
                    hotel, cost = min(
                        (
                            (h, sum(self._price(state, city, h, k) for k in nights_here))
                            for h in state["hotels"][city]
                        ),
                        key=lambda x: (x[1], x[0]),
                    )
                    stays.append({"city": city, "hotel": hotel, "nights": n})
                    total += cost
                    for req in state["required"]:
                        rc, attr = where[req]
                        if rc != city:
                            continue
                        days = [
                            k
                            for k in nights_here
                            if (state["start_weekday"] + k - 1) % 7 in attr["open_days"]
                        ]
                        if not days:
                            ok = False
                            break
                        visits.append({"attraction": req, "day": days[0], "hour": attr["hours"][0]})
                    if not ok:
                        break
                    night += n
                if ok and (best is None or total < best[0]):
                    best = (total, {"stays": stays, "visits": visits})
        if best is None:  # make the planted world feasible: open every required attraction every day
            for lst in state["attractions"].values():
                for a in lst:
                    if a["name"] in state["required"]:
                        a["open_days"] = list(range(7))
            return self._cheapest(state)
        return best

    def tools(self, task: Task) -> list[Callable[..., Any]]:
        state = task.state

        def list_cities() -> str:
            """List the cities in the travel catalogue."""
            return json.dumps(sorted(state["hotels"]))

        def search_hotels(city: str, night: int) -> str:
            """Hotels in a city with their price for one night of the trip.

            Args:
                city: city name, as listed by list_cities.
                night: trip night number (1 = the night of day 1).
            """
            if city not in state["hotels"]:
                return f"error: unknown city {city!r}"
            if not 1 <= night <= 60:
                return "error: night must be between 1 and 60"
            return json.dumps(
                [
                    {"hotel": h, "price": self._price(state, city, h, night)}
                    for h in sorted(state["hotels"][city])
                ]
            )

        def quote_stay(city: str, hotel: str, first_night: int, nights: int) -> str:
            """Total price of staying in one hotel for consecutive nights.

            Args:
                city: city name.
                hotel: hotel name, as returned by search_hotels.
                first_night: trip night number of the first night.
                nights: number of consecutive nights.
            """
            if hotel not in state["hotels"].get(city, {}):
                return f"error: no hotel {hotel!r} in {city!r}"
            if not (1 <= first_night <= 60 and 1 <= nights <= 30):
                return "error: first_night must be 1..60 and nights 1..30"
            total = sum(self._price(state, city, hotel, k) for k in range(first_night, first_night + nights))
            return json.dumps({"hotel": hotel, "first_night": first_night, "nights": nights, "total": total})

        def attractions(city: str) -> str:
            """Attractions in a city with opening weekdays and hours (24h clock, [open, close)).

            Args:
                city: city name.
            """
            if city not in state["attractions"]:
                return f"error: unknown city {city!r}"
            return json.dumps(
                [
                    {"name": a["name"], "open_days": [_DAYS[k] for k in a["open_days"]], "hours": a["hours"]}
                    for a in state["attractions"][city]
                ]
            )

        def weekday(day: int) -> str:
            """Weekday of a trip day.

            Args:
                day: trip day number (1 = first day).
            """
            return _DAYS[(state["start_weekday"] + day - 1) % 7]

        return [list_cities, search_hotels, quote_stay, attractions, weekday]

    def solve(self, task: Task) -> Any:
        best = self._cheapest(json.loads(json.dumps(task.state)))
        assert best is not None
        return best[1]

    def verify(self, task: Task, answer: Any, trace: list[ToolCallRecord] | None = None) -> Score:
        st = task.state
        if not isinstance(answer, dict) or not isinstance(answer.get("stays"), list):
            return Score.fail('expected a JSON object with a "stays" list')
        visits = answer.get("visits", [])
        if not isinstance(visits, list):
            return Score.fail('"visits" must be a list')
        night, total, seen = 1, 0, []
        span: dict[str, tuple[int, int]] = {}
        for i, stay in enumerate(answer["stays"]):
            if not isinstance(stay, dict):
                return Score.fail(f"stay {i + 1} is not an object")
            city, hotel, n = stay.get("city"), stay.get("hotel"), stay.get("nights")
            if city not in st["cities"]:
                return Score.fail(f"stay {i + 1}: {city!r} is not one of the cities to visit")
            if city in seen:
                return Score.fail(f"city {city} is visited twice")
            if hotel not in st["hotels"][city]:
                return Score.fail(f"stay {i + 1}: no hotel {hotel!r} in {city}")
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                return Score.fail(f"stay {i + 1}: nights must be a positive integer")
            seen.append(city)
            span[city] = (night, night + n - 1)
            total += sum(self._price(st, city, hotel, k) for k in range(night, night + n))
            night += n
        if sorted(seen) != sorted(st["cities"]):
            return Score.fail(f"must visit exactly {sorted(st['cities'])}, got {sorted(seen)}")
        if night - 1 != st["nights"]:
            return Score.fail(f"trip has {night - 1} nights, expected {st['nights']}")
        if total > st["budget"]:
            return Score.fail(f"hotel bill {total} exceeds the budget {st['budget']}")
        where = {a["name"]: (c, a) for c, lst in st["attractions"].items() for a in lst}
        done = set()
        for v in visits:
            if not isinstance(v, dict) or v.get("attraction") not in where:
                return Score.fail(f"unknown attraction in visit {v!r}"[:200])
            city, attr = where[v["attraction"]]
            day, hour = v.get("day"), v.get("hour")
            if not isinstance(day, int) or not isinstance(hour, int | float):
                return Score.fail(f"visit to {attr['name']}: day and hour must be numbers")
            if city not in span or not span[city][0] <= day <= span[city][1]:
                return Score.fail(f"visit to {attr['name']} on day {day}: not in {city} that day")
            if (st["start_weekday"] + day - 1) % 7 not in attr["open_days"]:
                return Score.fail(f"{attr['name']} is closed on day {day}")
            if not attr["hours"][0] <= hour < attr["hours"][1]:
                return Score.fail(f"{attr['name']} is closed at hour {hour}")
            done.add(attr["name"])
        missing = sorted(set(st["required"]) - done)
        if missing:
            return Score.fail(f"required attractions not visited: {missing}")
        return Score.ok(f"valid plan, bill {total} within {st['budget']}")

    def perturb(self, task: Task, answer: Any, rng: random.Random) -> list[Any]:
        out = []
        stays = answer["stays"]
        # most expensive hotel everywhere: over budget
        st = task.state
        pricey = [
            {**s, "hotel": max(st["hotels"][s["city"]], key=lambda h, c=s["city"]: sum(st["hotels"][c][h]))}
            for s in stays
        ]
        out.append({**answer, "stays": pricey})
        out.append({**answer, "stays": stays[:-1]})  # a city missing / too few nights
        out.append({**answer, "stays": [*stays, stays[0]]})  # repeated city
        if answer["visits"]:
            out.append({**answer, "visits": answer["visits"][1:]})  # skipped attraction
            v = dict(answer["visits"][0])
            v["hour"] = 3  # closed at night
            out.append({**answer, "visits": [v, *answer["visits"][1:]]})
        bad = [dict(s) for s in stays]
        bad[0]["nights"] += 1
        out.append({**answer, "stays": bad})
        return [o for o in out if o != answer]
