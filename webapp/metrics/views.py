"""``GET /metrics``: Prometheus text for staff sessions and the operator's scrape token.

Anonymous requests and wrong tokens get 401 (with ``WWW-Authenticate: Bearer``), signed-in
users who are not staff 403. The token is ``CARRY_ON_METRICS_TOKEN``; without it only staff
sessions can read the figures.
"""

from __future__ import annotations

import hmac

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST

from webapp.metrics.exposition import metrics_text


def _bearer(request: HttpRequest) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _refusal(status: int, message: str) -> HttpResponse:
    response = HttpResponse(message, status=status, content_type="text/plain; charset=utf-8")
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
    return response


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    token = _bearer(request)
    expected = str(settings.CARRY_ON["METRICS_TOKEN"])
    if token is not None:
        if not (expected and hmac.compare_digest(token.encode(), expected.encode())):
            return _refusal(401, "This token may not read the metrics.\n")
    elif not request.user.is_authenticated:
        return _refusal(
            401, "Sign in as staff, or send 'Authorization: Bearer <CARRY_ON_METRICS_TOKEN>'.\n"
        )
    elif not (request.user.is_active and request.user.is_staff):
        return _refusal(403, "Only staff may read the metrics.\n")
    response = HttpResponse(metrics_text(), content_type=CONTENT_TYPE_LATEST)
    response["Cache-Control"] = "no-store"
    return response
