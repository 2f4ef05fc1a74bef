"""The side-by-side chart: what it draws is what it says (data-results), no data no chart."""

from __future__ import annotations

import json
import re

from webapp.evaluations.charts import comparison_svg
from webapp.evaluations.models import EvaluationResult


def _result(
    model: str, loss: float | None, match: float | None, correct: int = 0
) -> EvaluationResult:
    samples = [{"text": "", "answer": None, "correct": False}] * 4 if match is not None else []
    return EvaluationResult(
        model=model, kind="adapter", loss=loss, exact_match=match, n_correct=correct,
        samples=samples,
    )  # fmt: skip


def test_the_chart_draws_one_bar_per_model_and_figure() -> None:
    """Loss bars scale to the largest loss; exact-match bars to 100 %; figures as labels."""
    results = [
        _result("base", 2.0, 0.25, 1),
        _result("ft:a", 1.0, 0.5, 2),
        _result("ft:b", None, None),
    ]
    svg = str(comparison_svg(results))
    data = json.loads(re.search(r'data-results="([^"]*)"', svg).group(1).replace("&quot;", '"'))
    assert data == [["base", 2.0, 0.25], ["ft:a", 1.0, 0.5], ["ft:b", None, None]]
    widths = [float(w) for w in re.findall(r'<rect x="230" y="\d+" width="([\d.]+)"', svg)]
    assert widths == [340.0, 170.0, 85.0, 170.0]  # loss 2 and 1, then exact match 25 % and 50 %
    assert "2.0000" in svg
    assert "50% (2/4)" in svg
    assert "<script" not in svg


def test_no_figures_no_chart() -> None:
    """Before any model is scored the page shows a sentence instead of an empty chart."""
    assert comparison_svg([_result("base", None, None)]) == ""
    assert comparison_svg([_result("base", float("nan"), None)]) == ""
