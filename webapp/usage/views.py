"""The usage page and the CSV export: the signed-in user's own records only."""

from __future__ import annotations

import csv
from collections.abc import Iterator

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET

from webapp.usage import selectors
from webapp.usage.charts import usage_chart_svg

CHART_DAYS = 30
RECENT = 50
CSV_COLUMNS = (
    "id", "created_at", "model", "adapter_id", "api_key", "outcome", "prompt_tokens",
    "completion_tokens", "total_tokens", "time_to_first_token_s", "duration_s",
)  # fmt: skip


@login_required
@require_GET
def usage_page(request: HttpRequest) -> HttpResponse:
    daily = selectors.usage_daily(user=request.user, days=CHART_DAYS)
    context = {
        "daily": daily,
        "chart": usage_chart_svg(daily),
        "chart_days": CHART_DAYS,
        "records": selectors.usage_list(user=request.user)[:RECENT],
    }
    return render(request, "usage/usage.html", context)


class _Echo:
    """A file-like object that hands back what csv writes, to stream it."""

    def write(self, value: str) -> str:
        return value


def _csv_rows(request: HttpRequest) -> Iterator[str]:
    writer = csv.writer(_Echo())
    yield writer.writerow(CSV_COLUMNS)
    for r in selectors.usage_list(user=request.user).iterator(chunk_size=2000):
        yield writer.writerow(
            [
                r.id, r.created_at.isoformat(), r.model, r.adapter_id or "",
                r.api_key.prefix if r.api_key else "", r.outcome, r.prompt_tokens,
                r.completion_tokens, r.total_tokens,
                "" if r.time_to_first_token is None else f"{r.time_to_first_token:.4f}",
                f"{r.duration:.4f}",
            ]
        )  # fmt: skip


@login_required
@require_GET
def usage_export_csv(request: HttpRequest) -> StreamingHttpResponse:
    """Every record of the user's, newest first, as CSV (streamed: any number of rows)."""
    response = StreamingHttpResponse(_csv_rows(request), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = 'attachment; filename="usage.csv"'
    response["Cache-Control"] = "no-store"
    return response
