"""Fixed-window rate limits in the shared cache: per API key, per user, per address.

``RateLimit`` is the per-key limit every /v1 call counts against (its state goes out in the
``x-ratelimit-*`` headers); the rest are the per-user and per-address limits.

A counter is one cache key per (identity, scope, window); ``cache.incr`` is atomic in Redis,
so several web processes pointed at one CARRY_ON_CACHE_URL share every limit exactly.

Per-user scopes bound what one person can do whatever keys or sessions they hold: every /v1
call (``requests``), and the costly actions on the API and the pages alike (``ROUTE_SCOPES``
maps each route, by URL name and method, to its scope).
"""

from __future__ import annotations

import math
import time
from typing import Any

from django.conf import settings
from django.core.cache import cache
from rest_framework.request import Request

from webapp.core.exceptions import ApplicationError

# (URL name, method) -> scope of CARRY_ON["USER_RATE_LIMITS"]
ROUTE_SCOPES = {
    ("api-chat", "POST"): "chat",
    ("playground", "POST"): "chat",
    ("api-files", "POST"): "uploads",
    ("dashboard", "POST"): "uploads",
    ("file_list", "POST"): "uploads",
    ("file_example_create", "POST"): "uploads",
    ("api-jobs", "POST"): "jobs",
    ("job_new", "POST"): "jobs",
    ("job_create", "POST"): "jobs",
    ("job_retry", "POST"): "jobs",
    ("job_live", "GET"): "live",
    ("job_estimate", "GET"): "live",
    ("api-job", "GET"): "live",
    ("api-job-events", "GET"): "live",
    ("api-job-checkpoints", "GET"): "live",
    ("api-evaluations", "POST"): "evaluations",
    ("evaluation_new", "POST"): "evaluations",
    ("api-evaluation", "GET"): "live",
    ("evaluation_detail", "GET"): "live",
}

# scope -> (what is counted, the environment variable that sets its limit)
_SCOPES = {
    "requests": ("API requests", "CARRY_ON_USER_REQUESTS_PER_MINUTE"),
    "chat": ("chat completions", "CARRY_ON_USER_CHATS_PER_MINUTE"),
    "uploads": ("uploads", "CARRY_ON_USER_UPLOADS_PER_MINUTE"),
    "jobs": ("job creations", "CARRY_ON_USER_JOBS_PER_MINUTE"),
    "live": ("job and evaluation status requests", "CARRY_ON_USER_LIVE_PER_MINUTE"),
    "evaluations": ("evaluation creations", "CARRY_ON_USER_EVALUATIONS_PER_MINUTE"),
}


class Window:
    """One fixed window of ``seconds`` for one counter, counted in the cache."""

    def __init__(self, name: str, limit: int, seconds: int = 60):
        now = time.time()
        self.limit = limit
        self.seconds = seconds
        start = math.floor(now / seconds) * seconds
        self.key = f"ratelimit:{name}:{start}"
        self.reset_in = max(1, math.ceil(start + seconds - now))
        self.count = 0

    def hit(self) -> bool:
        """Count this request; False when it is over the limit."""
        cache.add(self.key, 0, timeout=self.seconds + 5)
        try:
            self.count = int(cache.incr(self.key))
        except ValueError:  # expired between add and incr
            cache.set(self.key, 1, timeout=self.seconds + 5)
            self.count = 1
        return self.count <= self.limit


def user_identity(user: Any) -> str:
    """A user's counter name: the row id with the join time, which a recreated database
    does not hand out again."""
    joined = user.date_joined.timestamp() if getattr(user, "date_joined", None) else 0
    return f"user:{user.pk}:{joined:.6f}"


class UserRateLimitExceeded(ApplicationError):
    status = 429
    type = "requests"

    def __init__(self, scope: str, window: Window):
        what, setting = _SCOPES.get(scope, (scope, scope))
        super().__init__(
            f"Rate limit reached: {window.limit} {what} per minute for this user ({setting}). "
            f"Try again in {window.reset_in}s.",
            code=f"user_rate_limit_{scope}",
        )
        self.retry_after = window.reset_in


def user_rate_limit_hit(*, user: Any, scope: str) -> None:
    """Count one ``scope`` action of ``user``; raises UserRateLimitExceeded beyond the limit."""
    limit = int(settings.CARRY_ON["USER_RATE_LIMITS"].get(scope, 0))
    if limit <= 0:  # 0 turns a scope off
        return
    window = Window(f"{user_identity(user)}:{scope}", limit)
    if not window.hit():
        raise UserRateLimitExceeded(scope, window)


def route_scope(url_name: str | None, method: str) -> str | None:
    return ROUTE_SCOPES.get((url_name or "", method.upper()))


class RateLimit:
    """A fixed one-minute window per API key (or session user), shared through the cache."""

    def __init__(self, request: Request):
        # Named by what never repeats (a key's hash, a user's join time), not by row ids,
        # which a restored or recreated database hands out again.
        hashed = getattr(request.auth, "hashed_key", "")
        identity = f"key:{hashed[:24]}" if hashed else user_identity(request.user)
        self.window = Window(identity, int(settings.CARRY_ON["RATE_LIMIT_PER_MINUTE"]))
        self.limit = self.window.limit
        self.reset_in = self.window.reset_in

    @property
    def count(self) -> int:
        return self.window.count

    def hit(self) -> bool:
        """Count this request; False when it is over the limit."""
        return self.window.hit()

    def headers(self) -> dict[str, str]:
        return {
            "x-ratelimit-limit-requests": str(self.limit),
            "x-ratelimit-remaining-requests": str(max(0, self.limit - self.count)),
            "x-ratelimit-reset-requests": f"{self.reset_in}s",
        }


class RateLimitExceeded(ApplicationError):
    status = 429
    type = "requests"

    def __init__(self, limit: RateLimit):
        super().__init__(
            f"Rate limit reached: {limit.limit} requests per minute for this key. "
            f"Try again in {limit.reset_in}s.",
            code="rate_limit_exceeded",
        )
        self.retry_after = limit.reset_in
