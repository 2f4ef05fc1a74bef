"""What the inline SVG charts share (the loss curve, usage bars, evaluation bars).

Drawn on the server with ``format_html``: no JavaScript, no CDN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

TICK_STYLE = mark_safe('font-size="11" fill="#4b5563"')


def finite(value: Any) -> float | None:
    """``value`` when it is a finite number (not NaN, not infinite, not missing), else None."""
    return value if isinstance(value, int | float) and math.isfinite(value) else None


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 2.5, 5 or 10 times a power of ten that is at least ``value`` (> 0)."""
    magnitude = 10 ** math.floor(math.log10(value))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= value)


def y_gridline(y: float, label: str, *, left: float, right: float) -> SafeString:
    """A horizontal grid line across the plot at ``y``, its value labelled left of it."""
    return format_html(
        '<line x1="{}" y1="{y}" x2="{}" y2="{y}" stroke="#e5e7eb"/>'
        '<text x="{}" y="{ty}" {} text-anchor="end">{}</text>',
        left,
        right,
        left - 6,
        TICK_STYLE,
        label,
        y=f"{y:.1f}",
        ty=f"{y + 4:.1f}",
    )


def join(parts: Iterable[SafeString]) -> SafeString:
    """Safe fragments, concatenated."""
    return format_html_join("", "{}", ((part,) for part in parts))
