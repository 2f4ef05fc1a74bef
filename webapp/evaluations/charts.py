"""Models side by side as an inline SVG bar chart: no JavaScript, no CDN (as the loss curve
in webapp/customizations/charts.py).

Two panels, one bar per model in the order picked: held-out loss (shorter is better) and
exact match (longer is better; the panel is left out when nothing was decoded). The drawn
figures ride along as ``data-results`` (``[[model, loss, exact_match], ...]``, null where a
figure is not known), so tests and scripts can read what the picture shows.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe

from webapp.core.charts import finite, join
from webapp.evaluations.models import EvaluationResult

WIDTH = 640
LABEL_W, RIGHT, ROW_H, BAR_H, HEAD_H = 230, 70, 24, 14, 26
COLOURS = ("#6b7280", "#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2")
TEXT = mark_safe('font-size="12" fill="#1f2937"')


def _label(name: str) -> str:
    """The end of a long name (where adapter names differ: suffix and job id)."""
    return name if len(name) <= 30 else "…" + name[-29:]


def _panel(
    title: str,
    values: Sequence[float | None],
    names: Sequence[str],
    top: int,
    scale: float,
    shown: Sequence[str],
) -> list[SafeString]:
    parts = [format_html('<text x="0" y="{}" font-size="13" font-weight="600" fill="#111827">'
                         "{}</text>", top + 16, title)]  # fmt: skip
    plot_w = WIDTH - LABEL_W - RIGHT
    for row, (value, name, text) in enumerate(zip(values, names, shown, strict=True)):
        y = top + HEAD_H + row * ROW_H
        parts.append(
            format_html('<text x="{}" y="{}" {} text-anchor="end">{}</text>',
                        LABEL_W - 8, y + BAR_H - 2, TEXT, _label(name))
        )  # fmt: skip
        if value is None:
            parts.append(format_html('<text x="{}" y="{}" {}>—</text>', LABEL_W, y + BAR_H - 2,
                                     TEXT))  # fmt: skip
            continue
        width = max(1.0, plot_w * value / scale) if scale > 0 else 1.0
        parts.append(
            format_html(
                '<rect x="{}" y="{}" width="{}" height="{}" fill="{}" data-model="{}"/>'
                '<text x="{}" y="{}" {}>{}</text>',
                LABEL_W, y, f"{width:.1f}", BAR_H, COLOURS[row % len(COLOURS)], name,
                f"{LABEL_W + width + 6:.1f}", y + BAR_H - 2, TEXT, text,
            )
        )  # fmt: skip
    return parts


def comparison_svg(results: Sequence[EvaluationResult]) -> SafeString:
    """Loss and exact match per model; an empty string until some figure is known."""
    names = [r.model for r in results]
    losses = [finite(r.loss) for r in results]
    matches = [finite(r.exact_match) for r in results]
    if all(v is None for v in losses + matches):
        return mark_safe("")
    parts: list[SafeString] = []
    top = 0
    if any(v is not None for v in losses):
        shown = [f"{v:.4f}" if v is not None else "" for v in losses]
        scale = max(v for v in losses if v is not None)
        parts += _panel("Held-out loss (lower is better)", losses, names, top, scale, shown)
        top += HEAD_H + ROW_H * len(results) + 12
    if any(v is not None for v in matches):
        shown = [
            f"{v:.0%} ({r.n_correct}/{len(r.samples)})" if v is not None else ""
            for v, r in zip(matches, results, strict=True)
        ]
        parts += _panel("Exact match (higher is better)", matches, names, top, 1.0, shown)
        top += HEAD_H + ROW_H * len(results) + 12
    data = [[r.model, loss, match] for r, loss, match in zip(results, losses, matches, strict=True)]
    summary = "; ".join(
        f"{name}: loss {loss:.4f}" if loss is not None else f"{name}: loss unknown"
        for name, loss in zip(names, losses, strict=True)
    )
    return format_html(
        '<svg xmlns="http://www.w3.org/2000/svg" class="evaluation-chart" viewBox="0 0 {w} {h}" '
        'preserveAspectRatio="xMinYMin meet" font-family="system-ui, sans-serif" role="img" '
        'style="width: 100%; max-width: {w}px" '
        'aria-labelledby="evaluation-chart-title" data-results="{data}">'
        '<title id="evaluation-chart-title">Models side by side: {summary}</title>{parts}</svg>',
        w=WIDTH,
        h=top,
        data=json.dumps(data, separators=(",", ":")),
        summary=summary,
        parts=join(parts),
    )
