import pytest

from customization.answers import (
    answers_match,
    checkable_examples,
    exact_match_rate,
    extract_final_answer,
)
from customization.datasets import Example


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48/2=<<48/2=24>>24 clips.\n#### 72", "72"),
        ("#### 1,000", "1000"),
        ("It costs $1,234.50 in total.\n#### $1,234.50", "1234.5"),
        ("#### 18.0", "18"),
        ("#### 18.", "18"),
        ("#### +7", "7"),
        ("#### -3", "-3"),
        ("#### -0", "0"),
        ("#### 007", "7"),
        ("first 5 then #### 6 and #### 9 apples", "9"),
        ("The answer is 42.", "42"),
        ("5-3=2, so she has 2 left, then 10 more: 12", "12"),
        ("#### \n but earlier 15", "15"),
        ("He ends with -$4.", "-4"),
        ("0.25 of the pie", "0.25"),
        ("values 1,2,3", "3"),
        ("no digits here", None),
        ("", None),
        ("#### none", None),
        ("item x2", None),
    ],
)
def test_extract_final_answer(text: str, expected: str | None) -> None:
    """The number after the last ####, else the last number, comes back normalized."""
    assert extract_final_answer(text) == expected


@pytest.mark.parametrize(
    ("predicted", "reference", "expected"),
    [
        ("1,000", "1000.00", True),
        ("$5", "5", True),
        ("+5", "5.", True),
        ("0.50", ".5", False),
        ("0.50", "0.5", True),
        ("-0", "0", True),
        ("72", "73", False),
        (None, "72", False),
        ("72", None, False),
        (None, None, False),
        ("abc", " abc ", True),
        ("12345678901234567890.1", "12345678901234567890.10", True),
        ("12345678901234567890.1", "12345678901234567890.2", False),
    ],
)
def test_answers_match_compares_numbers(
    predicted: str | None, reference: str | None, expected: bool
) -> None:
    """Equal numbers match whatever their formatting; None never matches."""
    assert answers_match(predicted, reference) is expected


def test_exact_match_rate_extracts_from_both_sides() -> None:
    """The rate is the fraction of predictions whose final answer equals the reference's."""
    references = ["3*4=<<3*4=12>>12\n#### 12", "#### 1,000", "#### 7"]
    predictions = ["So the answer is 12.", "#### 1000.0", "#### 8"]
    assert exact_match_rate(predictions, references) == pytest.approx(2 / 3)


def test_exact_match_rate_is_zero_for_no_predictions() -> None:
    """An empty evaluation scores 0.0 rather than dividing by zero."""
    assert exact_match_rate([], []) == 0.0


def test_exact_match_rate_rejects_mismatched_lengths() -> None:
    """Predictions and references must pair up one to one."""
    with pytest.raises(ValueError, match="references"):
        exact_match_rate(["1"], [])


def test_checkable_examples_need_a_marked_final_answer() -> None:
    """Only a last assistant answer ending in "#### N" can be checked by exact match."""
    marked = Example(
        messages=({"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "#### 4"}),
        line=1,
    )
    unmarked = Example(
        messages=({"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}),
        line=2,
    )
    assert checkable_examples([unmarked, marked, unmarked]) == [marked]
