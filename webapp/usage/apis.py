"""``GET /v1/usage``: the caller's chat completion records, listed like the rest of /v1."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from webapp.core.api.errors import ErrorSerializer
from webapp.core.api.objects import unix
from webapp.core.api.pagination import LIST_PARAMETERS, list_of, paginate
from webapp.core.api.views import ApiView
from webapp.usage.models import UsageRecord
from webapp.usage.selectors import usage_list


class UsageRecordSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField(help_text="Always 'usage.record'.")
    created_at = serializers.IntegerField()
    model = serializers.CharField()
    outcome = serializers.ChoiceField(choices=UsageRecord.Outcome.values)
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()
    time_to_first_token = serializers.FloatField(allow_null=True, help_text="Seconds.")
    duration = serializers.FloatField(help_text="Seconds.")
    api_key = serializers.CharField(allow_null=True, help_text="The key's visible prefix.")


def _render(record: UsageRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "object": "usage.record",
        "created_at": unix(record.created_at),
        "model": record.model,
        "outcome": record.outcome,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "total_tokens": record.total_tokens,
        "time_to_first_token": record.time_to_first_token,
        "duration": record.duration,
        "api_key": record.api_key.prefix if record.api_key else None,
    }


class UsageListApi(ApiView):
    @extend_schema(
        operation_id="listUsage",
        summary="Your chat completions, newest first (an extension: not part of OpenAI's API)",
        parameters=LIST_PARAMETERS,
        responses={
            200: list_of(UsageRecordSerializer, "UsageList"),
            **{s: ErrorSerializer for s in (400, 401, 429)},
        },
    )
    def get(self, request: Request) -> Response:
        return Response(paginate(request, usage_list(user=request.user), _render))
