"""A loss curve as an inline SVG: no JavaScript, no CDN, readable in the admin and pages."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

WIDTH, HEIGHT, PAD = 560, 220, 36
SERIES = (("train_loss", "#2563eb", "train loss"), ("valid_loss", "#dc2626", "valid loss"))


def loss_curve_svg(points: Sequence[dict[str, Any]]) -> SafeString:
    """Train (and validation) loss against step; an empty string when there is no data."""
    values = [p[key] for p in points for key, _, _ in SERIES if key in p]
    if not points or not values:
        return mark_safe("")
    max_step = max(p["step"] for p in points) or 1
    low, high = min(values), max(values)
    span = (high - low) or 1.0

    def xy(step: float, value: float) -> str:
        x = PAD + (WIDTH - 2 * PAD) * step / max_step
        y = HEIGHT - PAD - (HEIGHT - 2 * PAD) * (value - low) / span
        return f"{x:.1f},{y:.1f}"

    lines = []
    legend = []
    for index, (key, colour, label) in enumerate(SERIES):
        series = [xy(p["step"], p[key]) for p in points if key in p]
        if not series:
            continue
        if len(series) == 1:
            x, y = series[0].split(",")
            lines.append(format_html('<circle cx="{}" cy="{}" r="3" fill="{}"/>', x, y, colour))
        else:
            lines.append(
                format_html(
                    '<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>',
                    colour,
                    " ".join(series),
                )
            )
        legend.append(
            format_html(
                '<text x="{}" y="14" fill="{}" font-size="11">{}</text>',
                PAD + 110 * index,
                colour,
                label,
            )
        )
    return format_html(
        '<svg xmlns="http://www.w3.org/2000/svg" class="loss-curve" width="{w}" height="{h}" '
        'viewBox="0 0 {w} {h}" role="img" aria-label="loss curve">'
        '<rect x="0" y="0" width="{w}" height="{h}" fill="#fff" stroke="#ddd"/>'
        '<line x1="{p}" y1="{b}" x2="{r}" y2="{b}" stroke="#999"/>'
        '<line x1="{p}" y1="{p}" x2="{p}" y2="{b}" stroke="#999"/>'
        '<text x="4" y="{p}" font-size="10">{high}</text>'
        '<text x="4" y="{b}" font-size="10">{low}</text>'
        '<text x="{r}" y="{steps_y}" font-size="10" text-anchor="end">step {max_step}</text>'
        "{lines}{legend}</svg>",
        w=WIDTH,
        h=HEIGHT,
        p=PAD,
        b=HEIGHT - PAD,
        r=WIDTH - PAD,
        steps_y=HEIGHT - PAD + 14,
        high=f"{high:.3f}",
        low=f"{low:.3f}",
        max_step=max_step,
        lines=format_html_join("", "{}", ((line,) for line in lines)),
        legend=format_html_join("", "{}", ((item,) for item in legend)),
    )
