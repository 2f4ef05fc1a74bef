"""``/v1/evaluations``: create, list, retrieve and cancel evaluations (an extension of the API).

Shaped like the rest of /v1: objects with ``id``, ``object`` and Unix ``created_at``, OpenAI's
list envelope and cursor pagination, errors naming the bad parameter. Each view parses
input, calls one service or selector, and serializes.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from webapp.core.api.errors import ERRORS, ErrorSerializer
from webapp.core.api.objects import error_object, unix
from webapp.core.api.pagination import LIST_PARAMETERS, list_of, paginate
from webapp.core.api.parsing import refuse_unknown_fields
from webapp.core.api.views import ApiView
from webapp.evaluations import selectors
from webapp.evaluations.models import Evaluation, EvaluationResult
from webapp.evaluations.services import evaluation_cancel, evaluation_create


class EvaluationCreateSerializer(serializers.Serializer):
    file = serializers.JSONField(help_text="The held-out file's id (an upload, JSONL chats).")
    models = serializers.JSONField(
        help_text="Names of the base, your fine-tuned models or checkpoints, on one base."
    )
    limit = serializers.JSONField(
        required=False, allow_null=True, help_text="Examples scored for loss (default: all)."
    )
    max_length = serializers.JSONField(
        required=False, allow_null=True, help_text="Tokens per example (default 512)."
    )
    exact_match = serializers.JSONField(
        required=False,
        allow_null=True,
        help_text="Problems decoded greedily for exact match, among those whose answer ends "
        'in "#### N" (default 16; 0: none).',
    )
    max_tokens = serializers.JSONField(
        required=False, allow_null=True, help_text="New tokens per decoded answer (default 256)."
    )

    def to_internal_value(self, data: Any) -> Any:
        refuse_unknown_fields(self, data)
        return super().to_internal_value(data)


class SampleSerializer(serializers.Serializer):
    text = serializers.CharField()
    answer = serializers.CharField(allow_null=True)
    correct = serializers.BooleanField()


class ResultSerializer(serializers.Serializer):
    model = serializers.CharField()
    kind = serializers.CharField(help_text="base, adapter or checkpoint")
    loss = serializers.FloatField(allow_null=True)
    token_accuracy = serializers.FloatField(allow_null=True)
    exact_match = serializers.FloatField(allow_null=True)
    n_correct = serializers.IntegerField(allow_null=True)
    samples = SampleSerializer(many=True)


class ProblemSerializer(serializers.Serializer):
    line = serializers.IntegerField()
    prompt = serializers.CharField()
    reference = serializers.CharField()
    answer = serializers.CharField(allow_null=True)


class EvaluationErrorSerializer(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()
    param = serializers.CharField(allow_null=True)


class EvaluationSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField(help_text="Always 'evaluation'.")
    created_at = serializers.IntegerField()
    finished_at = serializers.IntegerField(allow_null=True)
    status = serializers.ChoiceField(choices=Evaluation.Status.values)
    progress = serializers.FloatField()
    error = EvaluationErrorSerializer(allow_null=True)
    model = serializers.CharField(help_text="The base model all evaluated models share.")
    models = serializers.ListField(child=serializers.CharField())
    file = serializers.CharField(allow_null=True)
    limit = serializers.IntegerField()
    max_length = serializers.IntegerField()
    exact_match = serializers.IntegerField(help_text="Problems asked for.")
    max_tokens = serializers.IntegerField()
    n_examples = serializers.IntegerField(allow_null=True, help_text="Examples scored.")
    n_problems = serializers.IntegerField(allow_null=True, help_text="Problems decoded.")
    problems = ProblemSerializer(many=True)
    results = ResultSerializer(many=True)


def result_object(result: EvaluationResult) -> dict[str, Any]:
    return {
        "model": result.model,
        "kind": result.kind,
        "loss": result.loss,
        "token_accuracy": result.token_accuracy,
        "exact_match": result.exact_match,
        "n_correct": result.n_correct,
        "samples": result.samples,
    }


def evaluation_object(evaluation: Evaluation) -> dict[str, Any]:
    results = list(evaluation.results.all())
    return {
        "id": evaluation.id,
        "object": "evaluation",
        "created_at": unix(evaluation.created_at),
        "finished_at": unix(evaluation.finished_at),
        "status": evaluation.status,
        "progress": evaluation.progress,
        "error": error_object(evaluation.error),
        "model": evaluation.base.name,
        "models": [r.model for r in results],
        "file": evaluation.file_id,
        "limit": evaluation.limit,
        "max_length": evaluation.max_length,
        "exact_match": evaluation.exact_match,
        "max_tokens": evaluation.max_tokens,
        "n_examples": evaluation.n_examples,
        "n_problems": evaluation.n_problems,
        "problems": evaluation.problems,
        "results": [result_object(r) for r in results],
    }


class EvaluationListCreateApi(ApiView):
    @extend_schema(
        operation_id="createEvaluation",
        summary="Score models side by side on a held-out file: loss and exact match",
        request=EvaluationCreateSerializer,
        responses={200: EvaluationSerializer, 403: ErrorSerializer, **ERRORS},
    )
    def post(self, request: Request) -> Response:
        form = EvaluationCreateSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        data = form.validated_data
        evaluation = evaluation_create(
            user=request.user,
            file=data["file"],
            models=data["models"],
            limit=data.get("limit"),
            max_length=data.get("max_length"),
            exact_match=data.get("exact_match"),
            max_tokens=data.get("max_tokens"),
        )
        return Response(evaluation_object(evaluation))

    @extend_schema(
        operation_id="listEvaluations",
        parameters=LIST_PARAMETERS,
        responses={200: list_of(EvaluationSerializer, "EvaluationList"), **ERRORS},
    )
    def get(self, request: Request) -> Response:
        rows = selectors.evaluation_list(user=request.user)
        return Response(paginate(request, rows, evaluation_object))


class EvaluationDetailApi(ApiView):
    @extend_schema(
        operation_id="retrieveEvaluation", responses={200: EvaluationSerializer, **ERRORS}
    )
    def get(self, request: Request, evaluation_id: str) -> Response:
        evaluation = selectors.evaluation_get(user=request.user, evaluation_id=evaluation_id)
        return Response(evaluation_object(evaluation))


class EvaluationCancelApi(ApiView):
    @extend_schema(
        operation_id="cancelEvaluation",
        request=None,
        responses={200: EvaluationSerializer, 409: ErrorSerializer, **ERRORS},
    )
    def post(self, request: Request, evaluation_id: str) -> Response:
        evaluation = selectors.evaluation_get(user=request.user, evaluation_id=evaluation_id)
        return Response(evaluation_object(evaluation_cancel(evaluation=evaluation)))
