"""Generated demo tasks: things the frozen base gets wrong and a carry-on learns in minutes.

Each task is a seeded generator of chat examples plus an exact checker for its answers, so
the demo (and the "try one" datasets of the web app) can show base-vs-adapter exact match
on held-out problems drawn from the same generator with another seed. Nothing is
downloaded; everything here is the standard library, so the web process can import it.

- ``dates`` (the default): a date written out in words -> ``YYYY-MM-DD`` and nothing else.
  Measured on the bundled base (400 examples, 3 epochs): base 0/50, carry-on 48/50.
- ``booking``: a booking request in free text -> one line of JSON in a fixed shape
  (``{"name", "city", "date", "nights"}``, the date as ISO 8601). The base knows JSON but
  not this shape; measured (400 examples, 5 epochs): base 0/40, carry-on 31/40, its misses
  a copied name or a swapped day and month.
- ``routing``: a customer message -> one label of a fixed set (``billing``, ``delivery``,
  ``account``, ``bug``, ``refund``). The base answers in sentences; measured (300
  examples, 3 epochs): base 0/40, carry-on 33/40.
- ``arithmetic``: the older multi-step word problems (``demo_data``); too hard for a 135M
  base to learn, kept to show where a carry-on's limits are.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

from customization.answers import answers_match, extract_final_answer
from customization.demo_data import generate_demo_problems

HELD_OUT_SEED = 10_001
"""The seed of held-out problems; training sets use seed 0 (any other seed than this)."""

Row = dict[str, object]


@dataclass(frozen=True)
class DemoTask:
    """One generated task and how the demo trains on it."""

    name: str
    title: str
    summary: str
    rows: Callable[[int, random.Random], list[Row]]
    check: Callable[[str, str], bool]
    """(prediction, reference) -> whether the prediction is exactly right."""
    n_train: int
    epochs: int
    learning_rate: float
    max_new_tokens: int

    def generate(self, n: int, *, seed: int) -> list[Row]:
        """``n`` JSONL rows, deterministic for ``seed``."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        return self.rows(n, random.Random(seed))

    def jsonl(self, n: int, *, seed: int) -> bytes:
        return "".join(json.dumps(row) + "\n" for row in self.generate(n, seed=seed)).encode()

    def held_out_prompts(self, n: int) -> list[str]:
        """The user turns of the first ``n`` held-out problems (suggestions for a chat)."""
        return [_user_turn(row) for row in self.generate(n, seed=HELD_OUT_SEED)]


def _user_turn(row: Row) -> str:
    if "messages" in row:
        messages = row["messages"]
        assert isinstance(messages, list)
        return str(messages[0]["content"])
    return str(row["question"])


def _chat(prompt: str, answer: str) -> Row:
    return {
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    }


# --- shared vocabulary ----------------------------------------------------------------

_MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
_DAYS_IN_MONTH = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
_FIRST = (
    "Maya", "Tom", "Aisha", "Ravi", "Elena", "Diego", "Priya", "Kenji",
    "Sofia", "Omar", "Chloe", "Lucas", "Hannah", "Mateo", "Zara", "Samuel",
    "Ingrid", "Felix", "Nadia", "Hugo", "Leila", "Marco", "Yuki", "Owen",
)  # fmt: skip
_LAST = (
    "Patel", "Nguyen", "Garcia", "Okafor", "Schmidt", "Rossi", "Kim", "Silva",
    "Novak", "Haddad", "Larsen", "Moreau", "Tanaka", "Byrne", "Costa", "Weber",
)  # fmt: skip
_CITIES = (
    "Lisbon", "Oslo", "Porto", "Vienna", "Kyoto", "Dublin", "Madrid", "Prague",
    "Berlin", "Seville", "Bergen", "Geneva", "Lyon", "Krakow", "Naples", "Tallinn",
)  # fmt: skip
_NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven")


def _date(rng: random.Random) -> tuple[int, int, int]:
    month = rng.randint(1, 12)
    return rng.randint(2024, 2027), month, rng.randint(1, _DAYS_IN_MONTH[month - 1])


def _ordinal(day: int) -> str:
    suffix = "th" if 10 <= day % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _spelled_date(rng: random.Random, year: int, month: int, day: int) -> str:
    """The date as people write it, in one of several styles."""
    name = _MONTHS[month - 1]
    styles = (
        f"{name} {day}, {year}",
        f"{day} {name} {year}",
        f"the {_ordinal(day)} of {name} {year}",
        f"{name} {_ordinal(day)} {year}",
        f"{name[:3]} {day} {year}",
    )
    return rng.choice(styles)


def _iso(year: int, month: int, day: int) -> str:
    return f"{year:04d}-{month:02d}-{day:02d}"


# --- booking: free text -> JSON in a fixed shape --------------------------------------------

_BOOKING_STYLES = (
    "{name} needs a room in {city} for {stay} from {date}.",
    "Please book {stay} in {city} for {name}, arriving {date}.",
    "Hotel for {name}: {city}, check-in {date}, {stay}.",
    "{name} is visiting {city} on {date} and will stay {stay}.",
    "Reserve a hotel in {city} starting {date} for {stay}. Guest: {name}.",
    "Can you get {name} a room? {city}, {stay}, from {date}.",
)


def _booking_rows(n: int, rng: random.Random) -> list[Row]:
    rows = []
    for _ in range(n):
        name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
        city, nights = rng.choice(_CITIES), rng.randint(1, 7)
        year, month, day = _date(rng)
        sentence = rng.choice(_BOOKING_STYLES).format(
            name=name,
            city=city,
            stay=f"{rng.choice((str(nights), _NUMBER_WORDS[nights - 1]))} night"
            + ("s" if nights > 1 else ""),
            date=_spelled_date(rng, year, month, day),
        )
        answer = {"name": name, "city": city, "date": _iso(year, month, day), "nights": nights}
        rows.append(_chat(f"Booking as JSON: {sentence}", json.dumps(answer)))
    return rows


def check_json(prediction: str, reference: str) -> bool:
    """The same JSON object: every key and value equal, no key missing or extra."""
    try:
        predicted = json.loads(prediction.strip())
    except json.JSONDecodeError:
        return False
    return bool(predicted == json.loads(reference))


# --- dates: a written-out date -> YYYY-MM-DD ------------------------------------------------


def _date_rows(n: int, rng: random.Random) -> list[Row]:
    rows = []
    for _ in range(n):
        year, month, day = _date(rng)
        spelled = _spelled_date(rng, year, month, day)
        rows.append(_chat(f"ISO date: {spelled}", _iso(year, month, day)))
    return rows


def check_text(prediction: str, reference: str) -> bool:
    """The same text once surrounding white space is stripped."""
    return prediction.strip() == reference.strip()


# --- routing: a customer message -> one label of a fixed set -------------------------------

_ITEMS = ("order", "parcel", "subscription", "invoice", "package", "headphones", "jacket")
_ROUTING: dict[str, tuple[str, ...]] = {
    "billing": (
        "I was charged twice for my {item} this month.",
        "Why does my invoice show {amount} euros more than last time?",
        "My card was billed for a {item} I never ordered.",
        "Can I pay my {item} by bank transfer instead of card?",
    ),
    "delivery": (
        "My {item} still has not arrived after {days} days.",
        "The tracking for my {item} has not moved since {weekday}.",
        "The courier left my {item} at the wrong address.",
        "When will my {item} be delivered? It is {days} days late.",
    ),
    "account": (
        "I cannot log in since I changed my email address.",
        "How do I change the password on my account?",
        "Please delete my account and all my data.",
        "I never got the code to verify my account on {weekday}.",
    ),
    "bug": (
        "The app crashes every time I open my {item} page.",
        "The checkout button does nothing when I click it.",
        "Since {weekday} the website shows an error 500 on my {item}.",
        "The search page freezes after {days} seconds.",
    ),
    "refund": (
        "I returned my {item} {days} days ago and still have no refund.",
        "I want my money back for the broken {item}.",
        "How long does a refund of {amount} euros take?",
        "Please refund the {item} I cancelled on {weekday}.",
    ),
}
_OPENERS = ("", "", "Hi!", "Hello.", "Hi team!", "Good morning.", "Hey there!")
_CLOSERS = ("", "", "Thanks.", "Thank you!", "Please help.", "Regards, {first}", "Cheers, {first}")
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _routing_rows(n: int, rng: random.Random) -> list[Row]:
    rows = []
    for _ in range(n):
        label = rng.choice(tuple(_ROUTING))
        message = rng.choice(_ROUTING[label]).format(
            item=rng.choice(_ITEMS),
            amount=rng.randint(5, 300),
            days=rng.randint(2, 21),
            weekday=rng.choice(_WEEKDAYS),
        )
        opener = rng.choice(_OPENERS)
        closer = rng.choice(_CLOSERS).format(first=rng.choice(_FIRST))
        ticket = " ".join(part for part in (opener, message, closer) if part)
        rows.append(_chat(f"Route this ticket: {ticket}", label))
    return rows


# --- arithmetic: the older multi-step word problems ----------------------------------------


def _arithmetic_rows(n: int, rng: random.Random) -> list[Row]:
    return [dict(row) for row in generate_demo_problems(n, seed=rng.randrange(2**31))]


def check_final_number(prediction: str, reference: str) -> bool:
    """The same final number (after ``####``, else the last number in the text)."""
    return answers_match(extract_final_answer(prediction), extract_final_answer(reference))


TASKS: dict[str, DemoTask] = {
    task.name: task
    for task in (
        DemoTask(
            name="dates",
            title="Dates to ISO 8601",
            summary="a date in words → YYYY-MM-DD",
            rows=_date_rows,
            check=check_text,
            n_train=400,
            epochs=3,
            learning_rate=3e-3,
            max_new_tokens=16,
        ),
        DemoTask(
            name="booking",
            title="Booking requests to JSON",
            summary="free-text hotel requests → one JSON line {name, city, date, nights}",
            rows=_booking_rows,
            check=check_json,
            n_train=400,
            epochs=5,
            learning_rate=3e-3,
            max_new_tokens=48,
        ),
        DemoTask(
            name="routing",
            title="Support ticket routing",
            summary="a customer message → billing, delivery, account, bug or refund",
            rows=_routing_rows,
            check=check_text,
            n_train=300,
            epochs=3,
            learning_rate=3e-3,
            max_new_tokens=8,
        ),
        DemoTask(
            name="arithmetic",
            title="Arithmetic word problems",
            summary="multi-step word problems with worked solutions (hard for a 135M base)",
            rows=_arithmetic_rows,
            check=check_final_number,
            n_train=500,
            epochs=3,
            learning_rate=3e-3,
            max_new_tokens=192,
        ),
    )
}
DEFAULT_TASK = "dates"


def get_task(name: str) -> DemoTask:
    """The task called ``name``; a ValueError lists the others."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown demo task {name!r}; choose one of {', '.join(TASKS)}") from None
