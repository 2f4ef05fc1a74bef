"""Log-in throttling: repeated failures lock further attempts out for a while.

Attempts are counted in the cache (shared by every web process when CARRY_ON_CACHE_URL
points at Redis) per (username, client address), per client address for any username (a
limit ten times higher), and per username from any address (LOGIN_MAX_FAILURES_PER_USERNAME),
so neither guessing one password, nor spraying usernames from one address, nor guessing
one password from many addresses goes far. A lockout lasts LOGIN_LOCKOUT_SECONDS from the
first attempt of its window.

Counting is atomic: an attempt *reserves* its place (``cache.incr``, one atomic INCR in
Redis) before the password is checked, and one whose place is past a limit is refused
unchecked. However many attempts arrive at once, on however many processes, exactly the
limit are ever checked. A successful log-in gives its places back (and clears its
(username, address) counter), so log-ins that succeed never lock anyone out.

Every log-in path is covered: ``LoginThrottleBackend`` (first in AUTHENTICATION_BACKENDS)
reserves and refuses for any authentication attempt, which covers the admin's log-in too,
and ``ThrottledLoginView`` answers the browser's sign-in form with a clear 429 page.

django-axes was considered: it checks and then counts in two steps, so a parallel burst
gets more than the limit of guesses checked, which is the very thing this must prevent.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from typing import Any

from django.conf import settings
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.signals import user_logged_in
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
    """(cache key prefix, attempt limit) of each counter an attempt belongs to; the first is
    the (username, address) one."""
    options = settings.CARRY_ON
    limit = int(options["LOGIN_MAX_FAILURES"])
    address = client_address(request)
    name = username.strip().lower()
    who = hashlib.sha256(f"{name}|{address}".encode()).hexdigest()[:32]
    where = hashlib.sha256(address.encode()).hexdigest()[:32]
    whom = hashlib.sha256(name.encode()).hexdigest()[:32]
    return [
        (f"login:pair:{who}", limit),
        (f"login:addr:{where}", limit * PER_ADDRESS_FACTOR),
        (f"login:user:{whom}", int(options["LOGIN_MAX_FAILURES_PER_USERNAME"])),
    ]


def _window_start(key: str, *, start: bool) -> float | None:
    """When the counter's current window began; with ``start``, begin one if there is none.
    Windows expire with the cache entry; the check against ``_now`` also ends one whose
    entry outlived it (a clock that moved, a test)."""
    window = int(settings.CARRY_ON["LOGIN_LOCKOUT_SECONDS"])
    since = cache.get(f"{key}:t")
    if since is not None and _now() - since >= window:
        cache.delete(f"{key}:t")
        since = None
    if since is None and start:
        cache.add(f"{key}:t", _now(), timeout=window)  # atomic: one racer's start wins
        since = cache.get(f"{key}:t")
    return since


def _count_key(key: str, since: float) -> str:
    return f"{key}:n:{since:.6f}"


def login_lockout(request: HttpRequest | None, username: str) -> int | None:
    """Seconds until this (username, address) may try again, or None when it may now."""
    window = int(settings.CARRY_ON["LOGIN_LOCKOUT_SECONDS"])
    waits = []
    for key, limit in _counters(request, username):
        since = _window_start(key, start=False)
        if since is None or (cache.get(_count_key(key, since)) or 0) < limit:
            continue
        waits.append(max(1, math.ceil(since + window - _now())))
    return max(waits) if waits else None


def login_reserve(request: HttpRequest | None, username: str) -> int | None:
    """Count one attempt in every counter, atomically; returns the seconds to wait when the
    attempt is past a limit (it must then be refused unchecked), else None."""
    window = int(settings.CARRY_ON["LOGIN_LOCKOUT_SECONDS"])
    over = []
    for key, limit in _counters(request, username):
        since = _window_start(key, start=True) or _now()
        count_key = _count_key(key, since)
        cache.add(count_key, 0, timeout=window)
        try:
            count = int(cache.incr(count_key))
        except ValueError:  # expired between add and incr
            cache.set(count_key, 1, timeout=window)
            count = 1
        if count > limit:
            over.append(max(1, math.ceil(since + window - _now())))
    return max(over) if over else None


def login_succeeded(request: HttpRequest | None, username: str) -> None:
    """Clear the (username, address) counter; give the attempt's place back to the others."""
    (pair, _), *others = _counters(request, username)
    since = _window_start(pair, start=False)
    if since is not None:
        cache.delete_many([f"{pair}:t", _count_key(pair, since)])
    if not getattr(request, "login_reserved", False):
        return  # a log-in without a password check (sign-up): it took no place
    for key, _ in others:
        since = _window_start(key, start=False)
        if since is not None:
            with contextlib.suppress(ValueError):  # the window ended meanwhile
                cache.decr(_count_key(key, since))


@receiver(user_logged_in)
def _on_logged_in(sender: Any, request: Any, user: Any, **_: Any) -> None:
    login_succeeded(request, user.get_username())


class LoginThrottleBackend:
    """Reserves a place for every authentication attempt; refuses one past a limit.

    It authenticates no one itself: when within the limits it steps aside (None) and the next
    backend decides. PermissionDenied stops Django from asking the other backends; the wait
    is left on the request for the sign-in form to report.
    """

    def authenticate(
        self, request: HttpRequest | None, username: str | None = None, **_: Any
    ) -> None:
        if username is None:
            return None
        wait = login_reserve(request, username)
        if request is not None:
            request.login_reserved = True  # type: ignore[attr-defined]
        if wait is not None:
            if request is not None:
                request.login_lockout_seconds = wait  # type: ignore[attr-defined]
            raise PermissionDenied("too many failed log-in attempts")
        return None

    # No get_user: this backend never logs anyone in, and without one Django's force_login
    # and session loading pass it by for the backend that did.


class ThrottledAuthenticationForm(AuthenticationForm):
    """Django's sign-in form; a locked-out attempt is refused with the wait named."""

    def clean(self) -> dict[str, Any]:
        wait = login_lockout(self.request, str(self.data.get("username", "")))
        if wait is None:
            try:
                return super().clean()
            except ValidationError:
                # Refused by the backend (past a limit), or simply the wrong password.
                wait = getattr(self.request, "login_lockout_seconds", None)
                if wait is None:
                    raise
        self.lockout_seconds = wait
        minutes = max(1, math.ceil(wait / 60))
        raise ValidationError(
            f"Too many failed sign-in attempts. Try again in {minutes} minute(s).",
            code="locked_out",
        )


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
