"""``{% usage_panel %}``: the dashboard's chart of the signed-in user's usage."""

from __future__ import annotations

from typing import Any

from django import template

from webapp.usage.charts import usage_chart_svg
from webapp.usage.selectors import usage_daily

register = template.Library()

DASHBOARD_DAYS = 14


@register.inclusion_tag("usage/_usage_panel.html", takes_context=True)
def usage_panel(context: dict[str, Any]) -> dict[str, Any]:
    daily = usage_daily(user=context["request"].user, days=DASHBOARD_DAYS)
    return {"daily": daily, "chart": usage_chart_svg(daily), "days": DASHBOARD_DAYS}
