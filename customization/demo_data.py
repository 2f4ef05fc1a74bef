"""A seeded generator of arithmetic word problems with worked, step-by-step solutions.

The demo dataset lets the whole pipeline (upload, extraction, training, exact-match
evaluation) run offline. It has GSM8K's shape, ``{"question", "answer"}`` with calculator
annotations such as ``3*12=<<3*12=36>>36`` and a final ``#### N`` line, but it is our own
generator: the project never ships GSM8K itself.

Every number is an integer, every division is exact, and every annotation is computed
by ``_calc``, so the worked answers are correct by construction.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class _Person:
    name: str
    he: str
    him: str
    his: str


_PEOPLE = tuple(
    _Person(name, *pronouns)
    for names, pronouns in (
        (
            ("Tom", "Ravi", "Diego", "Kenji", "Omar", "Lucas", "Mateo", "Samuel"),
            ("he", "him", "his"),
        ),
        (
            ("Maya", "Aisha", "Elena", "Priya", "Sofia", "Chloe", "Hannah", "Zara"),
            ("she", "her", "her"),
        ),
    )
    for name in names
)
_ITEMS = ("pencils", "apples", "stickers", "marbles", "cookies", "cards", "stamps", "beads")
_CONTAINERS = ("boxes", "packs", "bags", "jars", "crates")
_GOODS = (
    ("notebooks", "pens"),
    ("sandwiches", "juices"),
    ("shirts", "hats"),
    ("plants", "pots"),
    ("tickets", "snacks"),
)
_TARGETS = ("bike", "guitar", "tablet", "skateboard", "telescope", "camera")
_VEHICLES = ("train", "bus", "ferry", "truck")
_BILLS = (20, 50, 100, 200, 500)

_Problem = tuple[str, list[str], int]
"""(question, reasoning lines, final answer)."""


def generate_demo_problems(n: int, *, seed: int) -> list[dict[str, str]]:
    """``n`` GSM8K-style ``{"question", "answer"}`` problems, deterministic for ``seed``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        question, lines, answer = rng.choice(_TEMPLATES)(rng)
        problems.append({"question": question, "answer": "\n".join([*lines, f"#### {answer}"])})
    return problems


def write_demo_dataset(path: str | os.PathLike[str], n: int, *, seed: int) -> Path:
    """Write ``n`` demo problems as JSONL, atomically (temp file, then ``os.replace``)."""
    target = Path(path)
    problems = generate_demo_problems(n, seed=seed)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for problem in problems:
                f.write(json.dumps(problem, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return target


def _calc(a: int, op: str, b: int) -> tuple[str, int]:
    """``a op b`` written GSM8K style, ``12*3=<<12*3=36>>36``, and its value."""
    if op == "/":
        assert a % b == 0, "demo divisions must be exact"
        result = a // b
    else:
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
    expr = f"{a}{op}{b}"
    return f"{expr}=<<{expr}={result}>>{result}", result


def _shopping_change(rng: random.Random) -> _Problem:
    p = rng.choice(_PEOPLE)
    count, price = rng.randint(2, 9), rng.randint(2, 15)
    container, item = rng.choice(_CONTAINERS), rng.choice(_ITEMS)
    cost_text, cost = _calc(count, "*", price)
    bill = next(bill for bill in _BILLS if bill > cost)
    change_text, change = _calc(bill, "-", cost)
    question = (
        f"{p.name} buys {count} {container} of {item} for ${price} each and pays with a "
        f"${bill} bill. How much change does {p.he} get, in dollars?"
    )
    lines = [
        f"The {container} cost {cost_text} dollars.",
        f"{p.name} gets {change_text} dollars in change.",
    ]
    return question, lines, change


def _shopping_total(rng: random.Random) -> _Problem:
    p = rng.choice(_PEOPLE)
    first, second = rng.choice(_GOODS)
    n1, n2 = rng.randint(2, 8), rng.randint(2, 8)
    price1, price2 = rng.randint(3, 20), rng.randint(1, 10)
    text1, cost1 = _calc(n1, "*", price1)
    text2, cost2 = _calc(n2, "*", price2)
    total_text, total = _calc(cost1, "+", cost2)
    question = (
        f"{p.name} buys {n1} {first} at ${price1} each and {n2} {second} at ${price2} each. "
        f"How many dollars does {p.he} spend in total?"
    )
    lines = [
        f"The {first} cost {text1} dollars.",
        f"The {second} cost {text2} dollars.",
        f"Altogether {p.he} spends {total_text} dollars.",
    ]
    return question, lines, total


def _travel_two_legs(rng: random.Random) -> _Problem:
    p = rng.choice(_PEOPLE)
    speed1, hours1 = rng.randrange(30, 75, 5), rng.randint(1, 5)
    speed2, hours2 = rng.randrange(20, 70, 5), rng.randint(1, 4)
    text1, leg1 = _calc(speed1, "*", hours1)
    text2, leg2 = _calc(speed2, "*", hours2)
    total_text, total = _calc(leg1, "+", leg2)
    question = (
        f"{p.name} drives for {hours1} hours at {speed1} miles per hour, then for {hours2} "
        f"hours at {speed2} miles per hour. How many miles does {p.he} drive in total?"
    )
    lines = [
        f"First {p.he} drives {text1} miles.",
        f"Then {p.he} drives {text2} miles.",
        f"In total {p.he} drives {total_text} miles.",
    ]
    return question, lines, total


def _travel_same_speed(rng: random.Random) -> _Problem:
    vehicle = rng.choice(_VEHICLES)
    speed, hours, later_hours = rng.randrange(20, 90, 5), rng.randint(2, 6), rng.randint(2, 9)
    distance = speed * hours
    speed_text, speed = _calc(distance, "/", hours)
    far_text, far = _calc(speed, "*", later_hours)
    question = (
        f"A {vehicle} travels {distance} miles in {hours} hours. At the same speed, how many "
        f"miles does it travel in {later_hours} hours?"
    )
    lines = [
        f"The {vehicle} travels {speed_text} miles per hour.",
        f"In {later_hours} hours it travels {far_text} miles.",
    ]
    return question, lines, far


def _sharing(rng: random.Random) -> _Problem:
    p = rng.choice(_PEOPLE)
    container, item = rng.choice(_CONTAINERS), rng.choice(_ITEMS)
    # At least 10 items for at most 8 friends: something is always left to share.
    friends, count, per = rng.randint(2, 8), rng.randint(2, 6), rng.randint(5, 15)
    total_text, total = _calc(count, "*", per)
    kept = total % friends or friends
    rest_text, rest = _calc(total, "-", kept)
    each_text, each = _calc(rest, "/", friends)
    question = (
        f"{p.name} has {count} {container} with {per} {item} in each. {p.he.capitalize()} "
        f"keeps {kept} {item} and shares the rest equally among {friends} friends. "
        f"How many {item} does each friend get?"
    )
    lines = [
        f"{p.name} has {total_text} {item}.",
        f"After keeping some, {p.he} shares {rest_text} {item}.",
        f"Each friend gets {each_text} {item}.",
    ]
    return question, lines, each


def _savings_weeks(rng: random.Random) -> _Problem:
    p = rng.choice(_PEOPLE)
    target = rng.choice(_TARGETS)
    start, weekly, weeks = rng.randint(5, 80), rng.randrange(5, 40, 5), rng.randint(2, 12)
    cost = start + weekly * weeks
    need_text, need = _calc(cost, "-", start)
    weeks_text, weeks = _calc(need, "/", weekly)
    question = (
        f"{p.name} has ${start} and saves ${weekly} every week. How many weeks will it take "
        f"{p.him} to afford a {target} that costs ${cost}?"
    )
    lines = [
        f"{p.name} still needs {need_text} dollars.",
        f"Saving {weekly} dollars a week, that takes {weeks_text} weeks.",
    ]
    return question, lines, weeks


def _wages(rng: random.Random) -> _Problem:
    p = rng.choice(_PEOPLE)
    rate, hours, days, weeks = (
        rng.randint(8, 30),
        rng.randint(2, 8),
        rng.randint(2, 6),
        rng.randint(2, 4),
    )
    day_text, daily = _calc(rate, "*", hours)
    week_text, weekly = _calc(daily, "*", days)
    total_text, total = _calc(weekly, "*", weeks)
    question = (
        f"{p.name} earns ${rate} an hour. {p.he.capitalize()} works {hours} hours a day, "
        f"{days} days a week. How many dollars does {p.he} earn in {weeks} weeks?"
    )
    lines = [
        f"Each day {p.he} earns {day_text} dollars.",
        f"Each week {p.he} earns {week_text} dollars.",
        f"In {weeks} weeks {p.he} earns {total_text} dollars.",
    ]
    return question, lines, total


def _collection(rng: random.Random) -> _Problem:
    """A multi-step story: a starting amount, then 2 to 4 changes to it."""
    p = rng.choice(_PEOPLE)
    friend = rng.choice([other for other in _PEOPLE if other != p])
    item = rng.choice(_ITEMS)
    have = rng.randint(10, 60)
    story, lines = [f"{p.name} has {have} {item}."], []
    for _ in range(rng.randint(2, 4)):
        sentence, step_lines, have = _collection_step(rng, p, friend, item, have)
        story.append(sentence)
        lines.extend(step_lines)
    question = " ".join([*story, f"How many {item} does {p.name} have now?"])
    return question, lines, have


def _collection_step(
    rng: random.Random, p: _Person, friend: _Person, item: str, have: int
) -> tuple[str, list[str], int]:
    """One change to the amount: (story sentence, reasoning lines, new amount)."""
    divisors = [d for d in range(2, 6) if have % d == 0 and have // d >= 2]
    kinds = ["packs", "gift"]
    kinds += ["give"] if have >= 4 else []
    kinds += ["split"] if divisors else []
    kinds += ["times"] if have <= 100 else []
    kind = rng.choice(kinds)
    if kind == "packs":
        packs, per = rng.randint(2, 5), rng.randint(3, 12)
        bought_text, bought = _calc(packs, "*", per)
        text, have = _calc(have, "+", bought)
        sentence = f"{p.he.capitalize()} buys {packs} packs with {per} {item} in each."
        lines = [
            f"{p.he.capitalize()} buys {bought_text} {item}.",
            f"Now {p.he} has {text} {item}.",
        ]
        return sentence, lines, have
    if kind == "gift":
        gift = rng.randint(3, 25)
        text, have = _calc(have, "+", gift)
        sentence = f"{friend.name} gives {p.him} {gift} more."
        return sentence, [f"After the gift {p.he} has {text} {item}."], have
    if kind == "give":
        given = rng.randint(1, have // 2)
        text, have = _calc(have, "-", given)
        sentence = f"{p.he.capitalize()} gives {given} {item} to {friend.name}."
        return sentence, [f"{p.he.capitalize()} has {text} {item} left."], have
    if kind == "split":
        piles = rng.choice(divisors)
        text, have = _calc(have, "/", piles)
        sentence = f"{p.he.capitalize()} splits them into {piles} equal piles and keeps one."
        return sentence, [f"One pile has {text} {item}."], have
    factor = rng.randint(2, 3)
    text, have = _calc(have, "*", factor)
    sentence = f"Then {p.his} collection {'doubles' if factor == 2 else 'triples'}."
    return sentence, [f"The collection grows to {text} {item}."], have


_TEMPLATES: tuple[Callable[[random.Random], _Problem], ...] = (
    _shopping_change,
    _shopping_total,
    _travel_two_legs,
    _travel_same_speed,
    _sharing,
    _savings_weeks,
    _wages,
    _collection,
)
