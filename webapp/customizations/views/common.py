"""What every page view shares."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from django.http import Http404, HttpRequest

from webapp.core.exceptions import NotFoundError

T = TypeVar("T")


def get_or_404(fetch: Callable[[], T]) -> T:
    """A selector's NotFoundError (missing, or someone else's) as Django's 404 page."""
    try:
        return fetch()
    except NotFoundError as exc:
        raise Http404(exc.message) from None


def bound(request: HttpRequest) -> tuple[Any, ...]:
    """A form's data: bound on POST (even an empty one), unbound on GET."""
    return (request.POST, request.FILES) if request.method == "POST" else ()
