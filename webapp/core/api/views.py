"""The base view of every /v1 endpoint: bearer keys or the session, rate-limited, JSON."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from django.http import HttpResponse
from rest_framework.authentication import SessionAuthentication
from rest_framework.negotiation import BaseContentNegotiation, DefaultContentNegotiation
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from webapp.accounts.authentication import ApiKeyAuthentication
from webapp.core.api.errors import exception_handler
from webapp.core.api.parsing import StrictJSONParser
from webapp.core.ratelimits import RateLimit, RateLimitExceeded, route_scope, user_rate_limit_hit


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
