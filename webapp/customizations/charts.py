"""A loss curve as an inline SVG: no JavaScript, no CDN, readable in the admin and pages.

The one implementation of the curve: the job page renders it server-side for the first
paint and re-fetches the same rendering while the job trains (see ``views.job_live``).
The drawn points also ride along as ``data-points`` (``[[step, train, valid], ...]``, null
where a series has no value), so tests and scripts can read what the picture shows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from webapp.core.charts import TICK_STYLE, finite, join, nice_ceiling, y_gridline

WIDTH, HEIGHT = 640, 260
LEFT, RIGHT, TOP, BOTTOM = 52, 16, 28, 36
# More points than this are thinned evenly (the last one is always kept).
MAX_POINTS = 600
SERIES = (
    ("train_loss", "#2563eb", "train loss", ""),
    ("valid_loss", "#dc2626", "validation loss", "6 3"),
)


def _finite(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points without NaN or infinite values (a diverged run), which have no place."""
    kept = []
    for point in points:
        clean = {
            key: value for key, value in point.items() if key == "step" or finite(value) is not None
        }
        if any(key in clean for key, *_ in SERIES):
            kept.append(clean)
    return kept


def _thin(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    if len(points) <= MAX_POINTS:
        return list(points)
    stride = len(points) / (MAX_POINTS - 1)
    picked = [points[int(i * stride)] for i in range(MAX_POINTS - 1)]
    return [*picked, points[-1]]


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round values spanning [low, high] for the y axis."""
    span = high - low
    step = nice_ceiling(span / max(1, count - 1))
    first = math.ceil(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-6:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _summary(points: Sequence[dict[str, Any]]) -> str:
    parts = [f"{len(points)} point(s), last step {points[-1]['step']}"]
    for key, _, label, _ in SERIES:
        values = [p[key] for p in points if key in p]
        if values:
            parts.append(f"{label} {values[0]:.3f} → {values[-1]:.3f}")
    return "; ".join(parts)


def loss_curve_svg(
    points: Sequence[dict[str, Any]], *, total_steps: int | None = None
) -> SafeString:
    """Train (and validation) loss against step; an empty string when there is no data.

    ``total_steps`` fixes the x axis to the whole run, so a curve drawn mid-training grows
    from the left instead of being stretched to the width.
    """
    points = _thin(_finite(points))
    values = [p[key] for p in points for key, *_ in SERIES if key in p]
    if not points or not values:
        return mark_safe("")
    max_step = max(total_steps or 0, max(p["step"] for p in points), 1)
    low, high = min(values), max(values)
    if high - low < 1e-6:
        low, high = low - 0.5, high + 0.5
    pad = (high - low) * 0.05
    low, high = max(0.0, low - pad), high + pad
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x_of(step: float) -> float:
        return LEFT + plot_w * step / max_step

    def y_of(value: float) -> float:
        return TOP + plot_h * (1 - (value - low) / (high - low))

    grid = []
    for tick in _ticks(low, high):
        grid.append(y_gridline(y_of(tick), f"{tick:g}", left=LEFT, right=WIDTH - RIGHT))
    for step in sorted({0, max_step // 2, max_step}):
        grid.append(
            format_html(
                '<text x="{}" y="{}" {} text-anchor="middle">{}</text>',
                f"{x_of(step):.1f}",
                HEIGHT - BOTTOM + 16,
                TICK_STYLE,
                step,
            )
        )
    lines, legend = [], []
    for index, (key, colour, label, dash) in enumerate(SERIES):
        series = [(x_of(p["step"]), y_of(p[key])) for p in points if key in p]
        if not series:
            continue
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in series)
        lines.append(
            format_html(
                '<polyline fill="none" stroke="{}" stroke-width="2" stroke-dasharray="{}" '
                'data-series="{}" points="{}"/>',
                colour,
                dash or "none",
                key,
                coords,
            )
        )
        if len(series) <= 40:  # markers where they do not turn into a smear
            lines.append(
                format_html_join(
                    "",
                    '<circle cx="{}" cy="{}" r="2.5" fill="{}"/>',
                    ((f"{x:.1f}", f"{y:.1f}", colour) for x, y in series),
                )
            )
        legend.append(
            format_html(
                '<g transform="translate({},10)"><rect width="14" height="3" y="4" fill="{}"/>'
                '<text x="19" y="10" font-size="12" fill="#1f2937">{}</text></g>',
                LEFT + 130 * index,
                colour,
                label,
            )
        )
    data = [[p["step"], p.get("train_loss"), p.get("valid_loss")] for p in points]
    return format_html(
        '<svg xmlns="http://www.w3.org/2000/svg" class="loss-curve" viewBox="0 0 {w} {h}" '
        'preserveAspectRatio="xMidYMid meet" font-family="system-ui, sans-serif" '
        'role="img" aria-labelledby="loss-curve-title" '
        'data-points="{data}" data-total-steps="{max_step}">'
        '<title id="loss-curve-title">Loss curve: {summary}</title>'
        '<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="#fff" stroke="#d1d5db"/>'
        "{grid}"
        '<text x="{r}" y="{h_minus}" font-size="11" fill="#4b5563" text-anchor="end">step</text>'
        "{lines}{legend}</svg>",
        w=WIDTH,
        h=HEIGHT,
        data=json.dumps(data, separators=(",", ":")),
        max_step=max_step,
        summary=_summary(points),
        l=LEFT,
        t=TOP,
        pw=plot_w,
        ph=plot_h,
        r=WIDTH - RIGHT,
        h_minus=HEIGHT - 4,
        grid=join(grid),
        lines=join(lines),
        legend=join(legend),
    )
