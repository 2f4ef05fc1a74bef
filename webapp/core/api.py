"""What every /v1 endpoint shares: auth, OpenAI-shaped errors, rate limits, pagination.

The API answers exactly like OpenAI's, so the official ``openai`` client works against it
unchanged: errors are ``{"error": {"message", "type", "param", "code"}}`` with the status
OpenAI uses, lists are ``{"object": "list", "data", "has_more", "first_id", "last_id"}``,
and every response carries ``x-ratelimit-*`` headers for the caller's key.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.db import InterfaceError, OperationalError
from django.db.models import Model, QuerySet
from django.http import HttpRequest, HttpResponse, JsonResponse
from drf_spectacular.utils import OpenApiParameter
from rest_framework import exceptions, serializers
from rest_framework.authentication import SessionAuthentication
from rest_framework.negotiation import BaseContentNegotiation, DefaultContentNegotiation
from rest_framework.parsers import JSONParser
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from webapp.accounts.authentication import ApiKeyAuthentication
from webapp.core.exceptions import ApplicationError
from webapp.core.ratelimits import Window, route_scope, user_identity, user_rate_limit_hit

logger = logging.getLogger(__name__)


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JsonResponse:
    """An OpenAI-shaped error outside DRF (middleware, plain Django views)."""
    response = JsonResponse(error_body(message, type=type, param=param, code=code), status=status)
    for name, value in (headers or {}).items():
        response[name] = value
    return response


# -- errors ---------------------------------------------------------------------------------


class ErrorDetailSerializer(serializers.Serializer):
    message = serializers.CharField()
    type = serializers.CharField()
    param = serializers.CharField(allow_null=True)
    code = serializers.CharField(allow_null=True)


class ErrorSerializer(serializers.Serializer):
    """OpenAI's error body."""

    error = ErrorDetailSerializer()


# Every operation may answer these; 503: the database or the broker is briefly unreachable.
ERRORS = {
    400: ErrorSerializer,
    401: ErrorSerializer,
    404: ErrorSerializer,
    429: ErrorSerializer,
    503: ErrorSerializer,
}


def refuse_unknown_fields(serializer: serializers.Serializer, data: Any) -> None:
    """Refuse a body naming a field the serializer does not know, as OpenAI does."""
    if isinstance(data, dict):
        for name in data:
            if name not in serializer.fields:
                raise serializers.ValidationError(
                    {name: [f"Unrecognized request argument supplied: {name}"]},
                    code="unknown",
                )


def error_object(error: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stored failure (``{"code", "message", "param"}``) as a job or evaluation shows it."""
    if not error:
        return None
    return {
        "code": str(error.get("code") or "error"),
        "message": str(error.get("message") or ""),
        "param": error.get("param"),
    }


def _first_validation_error(detail: Any, path: str = "") -> tuple[str, Any]:
    """(param path, message) of the first error in a DRF ValidationError detail.

    The message is DRF's ``ErrorDetail`` (a str with a ``code``) where there is one.
    """
    if isinstance(detail, dict):
        for key, value in detail.items():
            if key == "non_field_errors":
                name = path
            elif isinstance(key, int) or str(key).isdigit():  # an item of a list field
                name = f"{path}[{key}]"
            else:
                name = f"{path}.{key}" if path else str(key)
            return _first_validation_error(value, name)
    if isinstance(detail, list) and detail:
        first = detail[0]
        if isinstance(first, dict | list):
            index = next(i for i, item in enumerate(detail) if item)
            return _first_validation_error(detail[index], f"{path}[{index}]")
        return path, first
    return path, detail


# DRF's validation codes as OpenAI's: a missing argument, an unknown one, or a bad value.
_VALIDATION_CODES = {"required": "missing_required_parameter", "unknown": "unknown_parameter"}


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response:
    """Render every error raised in an API view in OpenAI's shape; never an HTML page."""
    if isinstance(exc, ApplicationError):
        body = exc.to_dict()
        response = Response(body, status=exc.status)
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            response["retry-after"] = str(retry_after)
        return response
    if isinstance(exc, exceptions.ValidationError):
        param, message = _first_validation_error(exc.detail)
        where = f"{param}: " if param else ""
        code = _VALIDATION_CODES.get(getattr(message, "code", ""), "invalid_value")
        return Response(
            error_body(
                f"{where}{message}", type="invalid_request_error", param=param or None, code=code
            ),
            status=400,
        )
    if isinstance(exc, exceptions.NotAuthenticated | exceptions.AuthenticationFailed):
        message = (
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'."
            if isinstance(exc, exceptions.NotAuthenticated)
            else str(exc.detail)
        )
        response = Response(
            error_body(message, type="invalid_request_error", code="invalid_api_key"), status=401
        )
        response["www-authenticate"] = 'Bearer realm="api"'
        return response
    if isinstance(exc, exceptions.ParseError):
        return Response(
            error_body(
                f"The request body is not valid: {exc.detail}",
                type="invalid_request_error",
                code="invalid_request_body",
            ),
            status=400,
        )
    if isinstance(exc, RequestDataTooBig):
        return Response(
            error_body(str(exc), type="invalid_request_error", code="request_too_large"),
            status=413,
        )
    if isinstance(exc, SuspiciousOperation):  # e.g. too many multipart fields or files
        return Response(
            error_body(
                f"The request was refused: {exc}",
                type="invalid_request_error",
                code="invalid_request_body",
            ),
            status=400,
        )
    if isinstance(exc, OperationalError | InterfaceError):
        # The database went away (restart, failover): this request fails cleanly and the
        # next one reconnects (CONN_HEALTH_CHECKS), so the caller can simply retry.
        logger.warning("database unavailable in %s: %s", context.get("view"), exc)
        response = Response(
            error_body(
                "The database is unavailable right now; retry shortly.",
                type="server_error",
                code="database_unavailable",
            ),
            status=503,
        )
        response["retry-after"] = "2"
        return response
    if isinstance(exc, exceptions.APIException):
        code = exc.get_codes() if isinstance(exc.get_codes(), str) else None
        return Response(
            error_body(str(exc.detail), type="invalid_request_error", code=code),
            status=exc.status_code,
        )
    logger.exception("unhandled error in %s", context.get("view"))
    return Response(
        error_body("The server had an error while processing your request.", type="server_error"),
        status=500,
    )


def not_found(request: HttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
    """Unknown routes under /v1 answer like OpenAI's: a JSON 404, never an HTML page."""
    return error_response(
        404,
        f"Invalid URL ({request.method} {request.path})",
        code="unknown_url",
    )


# -- parsing --------------------------------------------------------------------------------

MAX_JSON_DEPTH = 64
# NUL cannot be stored by PostgreSQL; a lone surrogate cannot be encoded as UTF-8 at all.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


class StrictJSONParser(JSONParser):
    """DRF's JSON parser, refusing with a 400 what would otherwise surface as a 500 later:
    nesting deeper than MAX_JSON_DEPTH (json recurses per level), NUL characters and lone
    surrogates in any string or key."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise exceptions.ParseError(
                f"JSON parse error - nested deeper than {MAX_JSON_DEPTH} levels"
            ) from None
        _check_json(data)
        return data


def _check_json(data: Any) -> None:
    """Walk the parsed document without recursion."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if _UNSTORABLE.search(value):
                raise exceptions.ParseError(
                    "JSON parse error - strings must not contain NUL characters or "
                    "unpaired surrogates"
                )
            continue
        if not isinstance(value, dict | list):
            continue
        if depth > MAX_JSON_DEPTH:
            raise exceptions.ParseError(
                f"JSON parse error - nested deeper than {MAX_JSON_DEPTH} levels"
            )
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        stack.extend((item, depth + 1) for item in items)


# -- rate limits ----------------------------------------------------------------------------


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


# -- the base view ----------------------------------------------------------------------------


class IgnoreAcceptNegotiation(BaseContentNegotiation):
    """Answer JSON whatever ``Accept`` says, as OpenAI does (the client asks for binary)."""

    def select_parser(self, request: Request, parsers: Sequence[Any]) -> Any:
        return DefaultContentNegotiation().select_parser(request, parsers)

    def select_renderer(
        self, request: Request, renderers: Sequence[Any], format_suffix: str | None = None
    ) -> tuple[Any, str]:
        return renderers[0], renderers[0].media_type


class ApiView(APIView):
    """Bearer API keys (or the browser session, for the playground), rate-limited."""

    authentication_classes = [ApiKeyAuthentication, SessionAuthentication]
    permission_classes = [IsAuthenticated]
    content_negotiation_class = IgnoreAcceptNegotiation
    parser_classes = [StrictJSONParser]  # like OpenAI: JSON bodies (uploads: multipart)

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        limit = RateLimit(request)
        request.rate_limit = limit  # type: ignore[attr-defined]
        if not limit.hit():
            raise RateLimitExceeded(limit)
        # Per user too, whatever key it comes with: all calls, then the costly ones.
        user_rate_limit_hit(user=request.user, scope="requests")
        match = request.resolver_match
        scope = route_scope(match.url_name if match else None, request.method or "")
        if scope is not None:
            user_rate_limit_hit(user=request.user, scope=scope)

    def finalize_response(
        self, request: Request, response: HttpResponse, *args: Any, **kwargs: Any
    ) -> HttpResponse:
        response = super().finalize_response(request, response, *args, **kwargs)
        limit = getattr(request, "rate_limit", None)
        if limit is not None:
            for name, value in limit.headers().items():
                response[name] = value
        return response

    def get_exception_handler(self) -> Callable[[Exception, dict[str, Any]], Response]:
        return exception_handler


# -- lists --------------------------------------------------------------------------------------


LIST_PARAMETERS = [
    OpenApiParameter("after", str, description="Cursor: the id of the last object seen."),
    OpenApiParameter("limit", int, description="Page size, 1 to 100 (default 20)."),
]


def list_of(item: type[serializers.Serializer], name: str) -> type[serializers.Serializer]:
    """A serializer for OpenAI's list envelope around ``item`` (for the schema)."""
    return type(
        name,
        (serializers.Serializer,),
        {
            "object": serializers.CharField(help_text="Always 'list'."),
            "data": item(many=True),
            "has_more": serializers.BooleanField(),
            "first_id": serializers.CharField(allow_null=True),
            "last_id": serializers.CharField(allow_null=True),
        },
    )


class ListQuery(serializers.Serializer):
    """``?after=<id>&limit=N``: OpenAI's cursor pagination."""

    after = serializers.CharField(required=False, max_length=256)
    limit = serializers.IntegerField(required=False, min_value=1, max_value=100, default=20)


def paginate(
    request: Request,
    rows: QuerySet[Any],
    render: Callable[[Any], dict[str, Any]],
    *,
    order: Sequence[str] = ("-created_at", "-pk"),
) -> dict[str, Any]:
    """One page after the ``after`` cursor (an object id), newest first by default."""
    query = ListQuery(data=request.query_params)
    query.is_valid(raise_exception=True)
    limit = query.validated_data["limit"]
    rows = rows.order_by(*order)
    after = query.validated_data.get("after")
    if after:
        anchor = rows.filter(pk=after).first()
        if anchor is None:
            raise ApplicationError(f"No such object for 'after': {after}", param="after")
        rows = _after(rows, anchor, order)
    page = list(rows[: limit + 1])
    data = [render(row) for row in page[:limit]]
    return {
        "object": "list",
        "data": data,
        "has_more": len(page) > limit,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def _after(rows: QuerySet[Any], anchor: Model, order: Sequence[str]) -> QuerySet[Any]:
    """Rows strictly after ``anchor`` in ``order`` (two keys: a value, then the pk)."""
    from django.db.models import Q

    (first, second) = order
    field, descending = first.lstrip("-"), first.startswith("-")
    tie = second.lstrip("-")
    value, tie_value = getattr(anchor, field), getattr(anchor, tie)
    beyond = "lt" if descending else "gt"
    tie_beyond = "lt" if second.startswith("-") else "gt"
    return rows.filter(
        Q(**{f"{field}__{beyond}": value}) | Q(**{field: value, f"{tie}__{tie_beyond}": tie_value})
    )


def unix(value: Any) -> int | None:
    """A datetime as OpenAI's integer Unix seconds."""
    return int(value.timestamp()) if value is not None else None
