"""Before any view: oversized bodies get 413 unread, NUL in URLs 400, and per-user rate
limits on the pages' costly actions 429."""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest
from django.urls import Resolver404, resolve

from webapp.core.api.errors import error_response
from webapp.core.exceptions import ApplicationError
from webapp.core.ratelimits import route_scope, user_rate_limit_hit

# Multipart framing around an uploaded file.
_UPLOAD_OVERHEAD = 64 * 1024
# Pages (URL names) that take an upload from a signed-in user: the dashboard, the files page.
_UPLOAD_PAGES = ("dashboard", "file_list")


class BodySizeLimitMiddleware:
    """Every body is refused with 413 before it is read when its Content-Length is over the
    limit: an upload may be CARRY_ON_MAX_UPLOAD_BYTES, but only from a signed-in session or
    a valid API key, on the routes that take uploads; everything else is held to
    DATA_UPLOAD_MAX_MEMORY_SIZE (2 MB), so no anonymous caller gets a large body spooled.

    It runs after the session and user are known (neither reads the body) and before CSRF's
    view hook, the first thing that would.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if length > limit and self._may_upload(request):
            limit = settings.CARRY_ON_MAX_UPLOAD_BYTES + _UPLOAD_OVERHEAD
        if length > limit:
            message = f"The request body is {length} bytes; the limit is {limit} bytes."
            if request.path.startswith("/v1/"):
                return error_response(413, message, code="request_too_large")
            return HttpResponse(message, status=413, content_type="text/plain; charset=utf-8")
        return self.get_response(request)

    @staticmethod
    def _may_upload(request: HttpRequest) -> bool:
        if request.path.startswith("/v1/"):
            if request.path.rstrip("/") != "/v1/files":
                return False
            return _has_valid_key(request) or request.user.is_authenticated
        return request.user.is_authenticated and _url_name(request) in _UPLOAD_PAGES


def _url_name(request: HttpRequest) -> str | None:
    try:
        return resolve(request.path_info).url_name
    except Resolver404:
        return None


def _has_valid_key(request: HttpRequest) -> bool:
    from webapp.accounts.selectors import api_key_authenticate

    words = request.META.get("HTTP_AUTHORIZATION", "").split()
    if len(words) != 2 or words[0].lower() != "bearer":
        return False
    return api_key_authenticate(raw_key=words[1]) is not None


class UserRateLimitMiddleware:
    """The pages' costly actions (chat, uploads, job creation, live job status) count
    against the signed-in user's limits, the same counters as the API's (ratelimits.py).
    /v1 is counted in ApiView, where the API key's user is known."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if not request.path.startswith("/v1/") and request.user.is_authenticated:
            scope = route_scope(_url_name(request), request.method or "")
            if scope is not None:
                try:
                    user_rate_limit_hit(user=request.user, scope=scope)
                except ApplicationError as exc:
                    response = HttpResponse(
                        exc.message, status=exc.status, content_type="text/plain; charset=utf-8"
                    )
                    response["Retry-After"] = str(getattr(exc, "retry_after", 60))
                    return response
        return self.get_response(request)


class NullCharacterMiddleware:
    """A NUL in the path or query string is a 400 everywhere.

    Ids and filters from the URL go into database queries, and PostgreSQL refuses NUL in
    text (psycopg raises before the query is sent), which would otherwise be a 500.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        query = request.META.get("QUERY_STRING", "")
        if "\x00" in request.path or "%00" in query or "\x00" in query:
            message = "The URL must not contain NUL characters."
            if request.path.startswith("/v1/"):
                return error_response(400, message, code="invalid_url")
            return HttpResponseBadRequest(message)
        return self.get_response(request)
