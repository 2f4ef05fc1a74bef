"""Log-in throttling: repeated failures lock further attempts out for a while.

Failures are counted in the cache (shared by every web process when CARRY_ON_CACHE_URL
points at Redis) per (username, client address), and per client address for any username
with a limit ten times higher, so neither guessing one password nor spraying many
usernames from one address goes far. A lockout lasts LOGIN_LOCKOUT_SECONDS from the first
failure of its window; a successful log-in clears its (username, address) counter.

Every log-in path is covered: ``LoginThrottleBackend`` (first in AUTHENTICATION_BACKENDS)
refuses any authentication attempt while locked out, which covers the admin's log-in too,
and ``ThrottledLoginView`` answers the browser's sign-in form with a clear 429 page.
"""

from __future__ import annotations

import hashlib
import math
import time
from typing import Any

from django.conf import settings
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.contrib.auth.views import LoginView
from django.core.cache import cache
from django.core.exceptions import PermissionDenied, ValidationError
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponse

PER_ADDRESS_FACTOR = 10


def _now() -> float:
    return time.time()


def client_address(request: HttpRequest | None) -> str:
    """The caller's address: REMOTE_ADDR, or the X-Forwarded-For entry that the last of
    TRUSTED_PROXIES proxies appended (entries before it are the client's own claims)."""
    if request is None:
        return "unknown"
    trusted = int(settings.CARRY_ON["TRUSTED_PROXIES"])
    forwarded = [a.strip() for a in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
    forwarded = [a for a in forwarded if a]
    if trusted > 0 and len(forwarded) >= trusted:
        return forwarded[-trusted][:64]
    return str(request.META.get("REMOTE_ADDR") or "unknown")[:64]


def _counters(request: HttpRequest | None, username: str) -> list[tuple[str, int]]:
    """(cache key prefix, failure limit) of each counter an attempt belongs to."""
    limit = int(settings.CARRY_ON["LOGIN_MAX_FAILURES"])
    address = client_address(request)
    who = hashlib.sha256(f"{username.strip().lower()}|{address}".encode()).hexdigest()[:32]
    where = hashlib.sha256(address.encode()).hexdigest()[:32]
    return [
        (f"login-fail:user:{who}", limit),
        (f"login-fail:addr:{where}", limit * PER_ADDRESS_FACTOR),
    ]


def login_lockout(request: HttpRequest | None, username: str) -> int | None:
    """Seconds until this (username, address) may try again, or None when it may now."""
    window = int(settings.CARRY_ON["LOGIN_LOCKOUT_SECONDS"])
    waits = []
    for key, limit in _counters(request, username):
        values = cache.get_many([f"{key}:n", f"{key}:t"])
        count, since = values.get(f"{key}:n") or 0, values.get(f"{key}:t")
        if since is None or count < limit:
            continue
        left = since + window - _now()
        if left > 0:
            waits.append(math.ceil(left))
    return max(waits) if waits else None


def login_failed(request: HttpRequest | None, username: str) -> None:
    window = int(settings.CARRY_ON["LOGIN_LOCKOUT_SECONDS"])
    for key, _ in _counters(request, username):
        since = cache.get(f"{key}:t")
        if since is None or _now() - since >= window:  # a new window starts here
            cache.set_many({f"{key}:t": _now(), f"{key}:n": 0}, timeout=window)
        cache.add(f"{key}:n", 0, timeout=window)
        try:
            cache.incr(f"{key}:n")
        except ValueError:  # expired between add and incr
            cache.set(f"{key}:n", 1, timeout=window)


def login_succeeded(request: HttpRequest | None, username: str) -> None:
    key, _ = _counters(request, username)[0]
    cache.delete_many([f"{key}:n", f"{key}:t"])


@receiver(user_login_failed)
def _on_login_failed(
    sender: Any, credentials: dict[str, Any], request: Any = None, **_: Any
) -> None:
    login_failed(request, str(credentials.get("username") or ""))


@receiver(user_logged_in)
def _on_logged_in(sender: Any, request: Any, user: Any, **_: Any) -> None:
    login_succeeded(request, user.get_username())


class LoginThrottleBackend:
    """Refuses every authentication attempt of a locked-out (username, address).

    It authenticates no one itself: when not locked out it steps aside (None) and the next
    backend decides. PermissionDenied stops Django from asking the other backends.
    """

    def authenticate(
        self, request: HttpRequest | None, username: str | None = None, **_: Any
    ) -> None:
        if username is not None and login_lockout(request, username):
            raise PermissionDenied("too many failed log-in attempts")
        return None

    def get_user(self, user_id: Any) -> None:
        return None


class ThrottledAuthenticationForm(AuthenticationForm):
    """Django's sign-in form; while locked out it refuses before trying (or counting) a log-in."""

    def clean(self) -> dict[str, Any]:
        wait = login_lockout(self.request, str(self.data.get("username", "")))
        if wait is not None:
            self.lockout_seconds = wait
            minutes = max(1, math.ceil(wait / 60))
            raise ValidationError(
                f"Too many failed sign-in attempts. Try again in {minutes} minute(s).",
                code="locked_out",
            )
        return super().clean()


class ThrottledLoginView(LoginView):
    """Django's sign-in view; a locked-out attempt gets the form back with a 429."""

    authentication_form = ThrottledAuthenticationForm

    def form_invalid(self, form: Any) -> HttpResponse:
        response = super().form_invalid(form)
        wait = getattr(form, "lockout_seconds", None)
        if wait is not None:
            response.status_code = 429
            response["Retry-After"] = str(wait)
        return response
