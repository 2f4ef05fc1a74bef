"""OpenAI's list envelope and its ``?after=<id>&limit=N`` cursor pagination."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from django.db.models import Model, QuerySet
from drf_spectacular.utils import OpenApiParameter
from rest_framework import serializers
from rest_framework.request import Request

from webapp.core.exceptions import ApplicationError

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
