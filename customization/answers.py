"""Final-answer extraction and exact match for math chain-of-thought (GSM8K style).

A worked answer ends with ``#### N``; a model's output may or may not keep that marker, so
extraction falls back to the last number in the text. Numbers are compared in a canonical
text form (no sign for zero, no thousands separators, no trailing fractional zeros), which
makes equal decimals equal exactly, without float rounding.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from customization.datasets import Example

_MARKER = "####"
_NUMBER = re.compile(
    r"""
    (?<![\w.])                          # not inside a word or another number
    (?P<sign>[-+]?)
    \$?
    (?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)
    (?P<frac>\.\d+)?
    """,
    re.VERBOSE | re.ASCII,
)


def extract_final_answer(text: str) -> str | None:
    """The number after the last ``####``, else the last number in ``text``, normalized.

    Returns None when the text holds no number.
    """
    _, marker, tail = text.rpartition(_MARKER)
    if marker:
        match = _NUMBER.search(tail)
        if match:
            return _canonical(match)
    matches = list(_NUMBER.finditer(text))
    return _canonical(matches[-1]) if matches else None


def has_marked_answer(text: str) -> bool:
    """Whether ``text`` gives its final answer as ``#### N``: an answer exact match can check."""
    _, marker, tail = text.rpartition(_MARKER)
    return bool(marker) and _NUMBER.search(tail) is not None


def checkable_examples(examples: Sequence[Example]) -> list[Example]:
    """The examples whose last assistant answer ends in ``#### N``: exact match can check them."""
    checkable = []
    for example in examples:
        answers = [m["content"] for m in example.messages if m["role"] == "assistant"]
        if answers and has_marked_answer(answers[-1]):
            checkable.append(example)
    return checkable


def answers_match(predicted: str | None, reference: str | None) -> bool:
    """Whether two answers are the same number ("1,000" == "1000.00" == "$1000").

    Strings that are not a single number are compared as stripped text; None never matches.
    """
    if predicted is None or reference is None:
        return False
    return _normalize(predicted) == _normalize(reference)


def exact_match_rate(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions whose final answer matches the reference's (0.0 if empty).

    References are full worked answers; the final answer is extracted from both sides.
    """
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return 0.0
    hits = sum(
        answers_match(extract_final_answer(predicted), extract_final_answer(reference))
        for predicted, reference in zip(predictions, references, strict=True)
    )
    return hits / len(predictions)


def _normalize(answer: str) -> str:
    stripped = answer.strip().removesuffix(".")
    match = _NUMBER.fullmatch(stripped)
    return _canonical(match) if match else stripped


def _canonical(match: re.Match[str]) -> str:
    """Sign, integer part without separators or leading zeros, fraction without trailing zeros."""
    integer = match["int"].replace(",", "").lstrip("0") or "0"
    fraction = (match["frac"] or "").rstrip("0").rstrip(".")
    number = integer + fraction
    negative = match["sign"] == "-" and number != "0"
    return f"-{number}" if negative else number
