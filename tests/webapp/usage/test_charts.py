"""The usage chart: what it draws is what the selector summed."""

from __future__ import annotations

import datetime
import html
import json
import re

from webapp.usage.charts import COLOURS, usage_chart_svg
from webapp.usage.selectors import DailyUsage


def _usage(models: dict[str, list[int]]) -> DailyUsage:
    days = [datetime.date(2026, 1, 1) + datetime.timedelta(days=i) for i in range(3)]
    return DailyUsage(
        days=days,
        tokens=models,
        requests=dict.fromkeys(models, 1),
        totals={m: {"prompt": 0, "completion": sum(v), "total": sum(v)} for m, v in models.items()},
    )


def _series(svg: str) -> dict[str, list[int]]:
    match = re.search(r'data-series="([^"]*)"', svg)
    assert match is not None
    return json.loads(html.unescape(match.group(1)))


def test_no_usage_draws_nothing() -> None:
    """An empty window is an empty string (the page says so in words)."""
    assert usage_chart_svg(_usage({})) == ""


def test_the_chart_stacks_each_model_per_day() -> None:
    """One bar segment per model and day with tokens; the data attribute holds the sums."""
    svg = str(usage_chart_svg(_usage({"ft:a": [0, 5, 10], "base": [3, 0, 0]})))
    assert _series(svg) == {"ft:a": [0, 5, 10], "base": [3, 0, 0]}
    assert svg.count("<rect x=") - 1 == 3  # three non-zero segments (plus the frame)
    assert "18 tokens over 3 days" in svg


def test_many_models_fold_into_other() -> None:
    """Past the palette, the smallest models are drawn together as one "other" series."""
    models = {f"m{i}": [10 - i, 0, 0] for i in range(len(COLOURS) + 2)}
    series = _series(str(usage_chart_svg(_usage(models))))
    assert len(series) == len(COLOURS)
    assert series["3 other models"] == [sum(10 - i for i in range(5, 8)), 0, 0]
