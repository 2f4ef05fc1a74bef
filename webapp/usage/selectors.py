"""Reads of usage records, always for one user; the admin's summary reads the records its
filters selected (staff only)."""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

from django.db.models import Avg, Count, F, QuerySet, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from webapp.accounts.models import User
from webapp.usage.models import UsageRecord


def usage_list(*, user: User) -> QuerySet[UsageRecord]:
    """The user's records, newest first."""
    return (
        UsageRecord.objects.filter(user=user)
        .select_related("api_key", "adapter")
        .order_by("-created_at", "-pk")
    )


@dataclasses.dataclass
class DailyUsage:
    """Tokens per model and day over a window of days (oldest first), for the chart."""

    days: list[datetime.date]
    tokens: dict[str, list[int]]  # model -> total tokens per day, aligned with days
    requests: dict[str, int]  # model -> requests in the window
    totals: dict[str, dict[str, int]]  # model -> prompt/completion/total tokens

    @property
    def empty(self) -> bool:
        return not self.requests

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One row per model, the busiest first: requests and tokens in the window."""
        return [{"model": m, "requests": n, **self.totals[m]} for m, n in self.requests.items()]


def usage_daily(*, user: User, days: int = 14, today: datetime.date | None = None) -> DailyUsage:
    """The user's tokens per model (an adapter, a checkpoint or a base) and UTC day."""
    today = today or timezone.now().date()
    first = today - datetime.timedelta(days=days - 1)
    window = [first + datetime.timedelta(days=i) for i in range(days)]
    rows = (
        UsageRecord.objects.filter(user=user, created_at__date__gte=first)
        .annotate(day=TruncDate("created_at"))
        .values("day", "model")
        .annotate(
            n=Count("pk"),
            prompt=Sum("prompt_tokens"),
            completion=Sum("completion_tokens"),
            total=Sum(F("prompt_tokens") + F("completion_tokens")),
        )
        .order_by()
    )
    tokens: dict[str, list[int]] = {}
    requests: dict[str, int] = {}
    totals: dict[str, dict[str, int]] = {}
    for row in rows:
        if row["day"] not in window:  # a record dated in the future (clock skew)
            continue
        model = row["model"]
        tokens.setdefault(model, [0] * days)[window.index(row["day"])] += row["total"]
        requests[model] = requests.get(model, 0) + row["n"]
        total = totals.setdefault(model, {"prompt": 0, "completion": 0, "total": 0})
        for key in ("prompt", "completion", "total"):
            total[key] += row[key]
    order = sorted(tokens, key=lambda m: -totals[m]["total"])
    return DailyUsage(
        days=window,
        tokens={m: tokens[m] for m in order},
        requests={m: requests[m] for m in order},
        totals={m: totals[m] for m in order},
    )


def usage_summary(*, records: QuerySet[UsageRecord]) -> list[dict[str, Any]]:
    """Per user and model: requests, tokens, mean duration (the admin's summary)."""
    return list(
        records.values("user__username", "model", "adapter_id")
        .annotate(
            requests=Count("pk"),
            prompt_tokens=Sum("prompt_tokens"),
            completion_tokens=Sum("completion_tokens"),
            mean_duration=Avg("duration"),
            mean_ttft=Avg("time_to_first_token"),
        )
        .order_by("user__username", "-completion_tokens", "model")
    )
