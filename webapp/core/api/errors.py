"""OpenAI-shaped errors: the body, its schema, and the handler every API view renders with."""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import RequestDataTooBig, SuspiciousOperation
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, JsonResponse
from rest_framework import exceptions, serializers
from rest_framework.response import Response

from webapp.core.exceptions import ApplicationError

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
