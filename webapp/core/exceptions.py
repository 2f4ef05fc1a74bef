"""Application errors, shaped like OpenAI's ``{"error": {"message", "type", "param", "code"}}``.

Services raise ``ApplicationError`` (or a subclass carrying its HTTP status); views and the
REST API render it without knowing which service raised it.
"""

from __future__ import annotations

from typing import Any


class ApplicationError(Exception):
    """A refusal the caller can act on: bad input, a missing record, a conflict."""

    status = 400
    type = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        type: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        if status is not None:
            self.status = status
        # A 400 without a more specific code is a bad argument value, as OpenAI answers it.
        self.code = code if code is not None or self.status != 400 else "invalid_value"
        if type is not None:
            self.type = type

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class NotFoundError(ApplicationError):
    """The record does not exist, or belongs to someone else (never tell which)."""

    status = 404

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message, param=param, code="not_found")


class ConflictError(ApplicationError):
    """The record is in a state that does not allow this action."""

    status = 409


class PayloadTooLargeError(ApplicationError):
    status = 413


class ServiceUnavailableError(ApplicationError):
    """A dependency (database, broker) is unreachable right now; the same request may succeed
    later. Nothing was created: the caller can simply retry after ``retry_after`` seconds."""

    status = 503
    type = "server_error"

    def __init__(self, message: str, *, code: str, retry_after: int = 5):
        super().__init__(message, code=code)
        self.retry_after = retry_after
