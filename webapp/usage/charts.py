"""Tokens per model and day as stacked bars in an inline SVG (no JavaScript, no CDN).

Like the loss curve (webapp/customizations/charts.py): drawn on the server, with the
numbers it shows riding along as ``data-days`` and ``data-series`` (``{model: [tokens per
day]}``), so tests and scripts read what the picture shows.
"""

from __future__ import annotations

import json

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from webapp.core.charts import TICK_STYLE, join, nice_ceiling, y_gridline
from webapp.usage.selectors import DailyUsage

WIDTH, HEIGHT = 640, 240
LEFT, RIGHT, TOP, BOTTOM = 60, 16, 16, 34
LEGEND_ROW = 18
# The largest series get their own colour; the rest are drawn together as "other".
COLOURS = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2")
OTHER_COLOUR = "#9ca3af"


def _nice_ceiling(value: int) -> int:
    """1, 2, 2.5 or 5 times a power of ten, at least ``value``."""
    if value <= 1:
        return 1
    return int(nice_ceiling(value))


def _series(usage: DailyUsage) -> list[tuple[str, str, list[int]]]:
    """(label, colour, tokens per day), biggest first, the tail folded into "other"."""
    models = list(usage.tokens)
    shown = models[: len(COLOURS)] if len(models) <= len(COLOURS) else models[: len(COLOURS) - 1]
    series = [(m, COLOURS[i], usage.tokens[m]) for i, m in enumerate(shown)]
    rest = [usage.tokens[m] for m in models[len(shown) :]]
    if rest:
        other = [sum(day) for day in zip(*rest, strict=True)]
        series.append((f"{len(rest)} other models", OTHER_COLOUR, other))
    return series


def usage_chart_svg(usage: DailyUsage) -> SafeString:
    """Stacked daily bars of total tokens per model; an empty string when there is none."""
    if usage.empty:
        return mark_safe("")
    series = _series(usage)
    n_days = len(usage.days)
    per_day = [sum(values[i] for _, _, values in series) for i in range(n_days)]
    top = _nice_ceiling(max(per_day))
    legend_h = LEGEND_ROW * len(series)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / n_days
    bar_w = max(2.0, slot * 0.7)

    def y_of(value: float) -> float:
        return TOP + plot_h * (1 - value / top)

    parts = []
    for tick in (0, top / 2, top):
        parts.append(y_gridline(y_of(tick), f"{tick:,.0f}", left=LEFT, right=WIDTH - RIGHT))
    for i, day in enumerate(usage.days):
        x = LEFT + slot * i + (slot - bar_w) / 2
        base = 0
        for label, colour, values in series:
            if values[i]:
                parts.append(
                    format_html(
                        '<rect x="{}" y="{}" width="{}" height="{}" fill="{}">'
                        "<title>{}: {} tokens on {}</title></rect>",
                        f"{x:.1f}",
                        f"{y_of(base + values[i]):.1f}",
                        f"{bar_w:.1f}",
                        f"{y_of(base) - y_of(base + values[i]):.1f}",
                        colour,
                        label,
                        f"{values[i]:,}",
                        day.isoformat(),
                    )
                )
                base += values[i]
        if i in (0, n_days // 2, n_days - 1):
            parts.append(
                format_html(
                    '<text x="{}" y="{}" {} text-anchor="middle">{}</text>',
                    f"{LEFT + slot * (i + 0.5):.1f}",
                    HEIGHT - BOTTOM + 16,
                    TICK_STYLE,
                    day.strftime("%b %d"),
                )
            )
    legend = format_html_join(
        "",
        '<g transform="translate({},{})"><rect width="12" height="12" fill="{}"/>'
        '<text x="18" y="10" font-size="12" fill="#1f2937">{}</text></g>',
        (
            (LEFT, HEIGHT + LEGEND_ROW * i, colour, label)
            for i, (label, colour, _) in enumerate(series)
        ),
    )
    total = sum(per_day)
    return format_html(
        '<svg xmlns="http://www.w3.org/2000/svg" class="usage-chart" viewBox="0 0 {w} {h}" '
        'preserveAspectRatio="xMidYMid meet" font-family="system-ui, sans-serif" role="img" '
        'style="width:100%;height:auto;max-width:760px;display:block" '
        'aria-labelledby="usage-chart-title" data-days="{days}" data-series="{data}">'
        '<title id="usage-chart-title">Tokens per model and day: {total} tokens over {n} days'
        "</title>"
        '<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="#fff" stroke="#d1d5db"/>'
        "{parts}{legend}</svg>",
        w=WIDTH,
        h=HEIGHT + legend_h,
        days=json.dumps([d.isoformat() for d in usage.days], separators=(",", ":")),
        data=json.dumps({label: values for label, _, values in series}, separators=(",", ":")),
        total=f"{total:,}",
        n=n_days,
        l=LEFT,
        t=TOP,
        pw=plot_w,
        ph=plot_h,
        parts=join(parts),
        legend=legend,
    )
