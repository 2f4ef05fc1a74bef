"""Refuse oversized API bodies with 413, and NUL characters in URLs with 400, before any view."""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest

from webapp.core.api import error_response

# Multipart framing around an uploaded file.
_UPLOAD_OVERHEAD = 64 * 1024


class BodySizeLimitMiddleware:
    """/v1 uploads may be CARRY_ON_MAX_UPLOAD_BYTES; every other API body 2 MB (settings)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path.startswith("/v1/"):
            try:
                length = int(request.META.get("CONTENT_LENGTH") or 0)
            except ValueError:
                length = 0
            limit = (
                settings.CARRY_ON_MAX_UPLOAD_BYTES + _UPLOAD_OVERHEAD
                if request.path.rstrip("/") == "/v1/files"
                else settings.DATA_UPLOAD_MAX_MEMORY_SIZE
            )
            if length > limit:
                return error_response(
                    413,
                    f"The request body is {length} bytes; the limit is {limit} bytes.",
                    code="request_too_large",
                )
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
