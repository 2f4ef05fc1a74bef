"""Account pages: sign-up (when the operator enables it) and API keys.

Sign in and out are Django's own views (``django.contrib.auth.urls``) with our templates.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods, require_POST

from webapp.accounts import selectors
from webapp.accounts.forms import ApiKeyCreateForm, SignupForm
from webapp.accounts.services import api_key_create, api_key_revoke, user_create
from webapp.accounts.throttling import client_address
from webapp.core.exceptions import ApplicationError, NotFoundError
from webapp.core.ratelimits import Window


def signup_enabled() -> bool:
    return bool(settings.CARRY_ON.get("SIGNUP_ENABLED", False))


@require_http_methods(["GET", "POST"])
def signup(request: HttpRequest) -> HttpResponse:
    if not signup_enabled():
        raise Http404("Sign-up is not enabled on this server.")
    if request.user.is_authenticated:
        return redirect("dashboard")
    if request.method == "POST":
        window = Window(
            f"signup:{client_address(request)}",
            int(settings.CARRY_ON["SIGNUPS_PER_HOUR"]),
            seconds=3600,
        )
        if not window.hit():
            response = HttpResponse(
                "Too many sign-ups from this address (CARRY_ON_SIGNUPS_PER_HOUR); "
                f"try again in {window.reset_in} seconds.",
                status=429,
                content_type="text/plain; charset=utf-8",
            )
            response["Retry-After"] = str(window.reset_in)
            return response
    form = SignupForm(*_bound(request))
    if request.method == "POST" and form.is_valid():
        try:
            user = user_create(
                username=form.cleaned_data["username"],
                email=form.cleaned_data["email"],
                password=form.cleaned_data["password1"],
            )
        except ApplicationError as exc:
            form.add_error("username" if exc.param == "username" else None, exc.message)
        else:
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            messages.success(request, f"Welcome, {user.username}! Start by uploading a dataset.")
            return redirect("dashboard")
    status = 400 if request.method == "POST" else 200
    return render(request, "registration/signup.html", {"form": form}, status=status)


@login_required
@require_http_methods(["GET", "POST"])
def api_key_list(request: HttpRequest) -> HttpResponse:
    """The user's keys; POST creates one, shown in this response only (never stored raw)."""
    form = ApiKeyCreateForm(*_bound(request))
    new_key = None
    status = 200
    if request.method == "POST":
        try:
            if not form.is_valid():
                status = 400
            else:
                key, raw = api_key_create(user=request.user, name=form.cleaned_data["name"])
                new_key = {"record": key, "raw": raw}
                form = ApiKeyCreateForm()
        except ApplicationError as exc:  # e.g. the key quota
            form.add_error(None, exc.message)
            status = exc.status
    keys = selectors.api_key_list(user=request.user)
    response = render(
        request,
        "accounts/apikey_list.html",
        {"form": form, "keys": keys, "new_key": new_key},
        status=status,
    )
    if new_key is not None:
        response["cache-control"] = "no-store"  # the raw key must not sit in a cache
    return response


@login_required
@require_POST
def api_key_revoke_view(request: HttpRequest, key_id: int) -> HttpResponse:
    try:
        key = selectors.api_key_get(user=request.user, key_id=key_id)
    except NotFoundError as exc:
        raise Http404(exc.message) from None
    api_key_revoke(api_key=key)
    label = key.name or f"{key.prefix}…"
    messages.success(request, f"The key “{label}” was revoked; it no longer works.")
    return redirect("api_key_list")


def _bound(request: HttpRequest) -> tuple[Any, ...]:
    """A form's data: bound on POST (even an empty one), unbound on GET."""
    return (request.POST, request.FILES) if request.method == "POST" else ()
