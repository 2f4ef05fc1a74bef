"""``/v1/fine_tuning/jobs``: create, list, retrieve and cancel jobs; their events and checkpoints.

A job's adapter options (``preset``, ``carry_on``, ``tail``) are extension fields.
"""

from __future__ import annotations

import re
from typing import Any

from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from customization.config import TAIL_LEARNING_RATE
from customization.presets import ADAPTER_KINDS, PRESETS
from webapp.core.api.errors import ERRORS, ErrorSerializer
from webapp.core.api.objects import error_object, unix
from webapp.core.api.pagination import LIST_PARAMETERS, list_of, paginate
from webapp.core.api.parsing import refuse_unknown_fields
from webapp.core.api.views import ApiView
from webapp.core.exceptions import ApplicationError
from webapp.customizations import selectors
from webapp.customizations.models import Checkpoint, FineTuningJob
from webapp.customizations.options import (
    BASE_LEARNING_RATE,
    CARRY_ON,
    TAIL,
    KindOptions,
    Option,
    hyperparameter_help,
)
from webapp.customizations.services.jobs import job_cancel, job_create


class HyperparametersSerializer(serializers.Serializer):
    n_epochs = serializers.JSONField(required=False, help_text=hyperparameter_help("n_epochs"))
    batch_size = serializers.JSONField(required=False, help_text=hyperparameter_help("batch_size"))
    learning_rate_multiplier = serializers.JSONField(
        required=False,
        help_text=f"{hyperparameter_help('learning_rate_multiplier')}: a multiplier of the base "
        f"rate, a carry-on's {BASE_LEARNING_RATE:g}, a tail's {TAIL_LEARNING_RATE:g}, or the "
        "preset's",
    )


def _option_field(option: Option) -> serializers.Field:
    """The schema's field for one option (the service checks the value itself)."""
    bounds = {
        key: value
        for key, value in (("min_value", option.low), ("max_value", option.high))
        if value is not None
    }
    text = {"required": False, "help_text": option.help or None}
    if option.default == "auto" or list in option.types:
        return serializers.JSONField(**text)
    if option.types == (int,):
        return serializers.IntegerField(**text, **bounds)
    if option.types == (int, float):
        return serializers.FloatField(**text, **bounds)
    if option.types == (bool,):
        return serializers.BooleanField(**text)
    return serializers.CharField(**text)


def options_serializer(name: str, registry: KindOptions, doc: str) -> type[serializers.Serializer]:
    """A serializer naming every option of one kind, for the schema (component ``name``)."""
    fields = {key: _option_field(option) for key, option in registry.options.items()}
    return type(f"{name}Serializer", (serializers.Serializer,), {"__doc__": doc, **fields})


CarryOnOptionsSerializer = options_serializer(
    "CarryOnOptions",
    CARRY_ON,
    "Extension: the carry-on's shape and extraction options (all optional).",
)
TailOptionsSerializer = options_serializer(
    "TailOptions",
    TAIL,
    "Extension: the tail's shape (LoRA on the base's top layers) and extras (all optional).",
)


@extend_schema_field(CarryOnOptionsSerializer)
class CarryOnOptionsField(serializers.JSONField):
    """Kept as JSON so the service checks it and names the wrong option (``carry_on.x``)."""


@extend_schema_field(TailOptionsSerializer)
class TailOptionsField(serializers.JSONField):
    """Kept as JSON so the service checks it and names the wrong option (``tail.x``)."""


_PRESETS_HELP = "Extension: " + "; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values())


class JobCreateSerializer(serializers.Serializer):
    model = serializers.CharField(
        max_length=255,
        help_text="A base model, or one of your fine-tuned models to continue training it "
        "(same base, kind and shape, starting from its weights)",
    )
    training_file = serializers.CharField(max_length=64)
    validation_file = serializers.CharField(max_length=64, required=False, allow_null=True)
    hyperparameters = serializers.JSONField(required=False, allow_null=True)
    method = serializers.JSONField(required=False, allow_null=True)
    suffix = serializers.CharField(max_length=64, required=False, allow_null=True, allow_blank=True)
    seed = serializers.IntegerField(required=False, allow_null=True)
    metadata = serializers.JSONField(required=False, allow_null=True)
    integrations = serializers.JSONField(required=False, allow_null=True)
    carry_on = CarryOnOptionsField(
        required=False, allow_null=True, help_text="Extension: carry-on options (a carry-on job)"
    )
    preset = serializers.CharField(
        required=False, allow_null=True, allow_blank=True, help_text=_PRESETS_HELP
    )
    tail = TailOptionsField(
        required=False, allow_null=True, help_text="Extension: tail options (a tail job)"
    )

    def to_internal_value(self, data: Any) -> Any:
        refuse_unknown_fields(self, data)
        return super().to_internal_value(data)

    def validate_integrations(self, value: Any) -> Any:
        if value:
            raise serializers.ValidationError("integrations are not supported by this server")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        method = attrs.get("method")
        if method:
            if not isinstance(method, dict) or method.get("type") != "supervised":
                raise serializers.ValidationError(
                    {"method": ["only method type 'supervised' is supported by carry-ons"]}
                )
            inner = (method.get("supervised") or {}).get("hyperparameters")
            if inner is not None and attrs.get("hyperparameters"):
                raise serializers.ValidationError(
                    {"hyperparameters": ["give hyperparameters in method or at the top, not both"]}
                )
            if inner is not None:
                attrs["hyperparameters"] = inner
        return attrs


class JobErrorSerializer(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()
    param = serializers.CharField(allow_null=True)


class JobSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField(help_text="Always 'fine_tuning.job'.")
    created_at = serializers.IntegerField()
    error = JobErrorSerializer(allow_null=True)
    fine_tuned_model = serializers.CharField(allow_null=True)
    finished_at = serializers.IntegerField(allow_null=True)
    hyperparameters = HyperparametersSerializer()
    model = serializers.CharField()
    organization_id = serializers.CharField()
    result_files = serializers.ListField(child=serializers.CharField())
    seed = serializers.IntegerField()
    status = serializers.ChoiceField(choices=FineTuningJob.Status.values)
    trained_tokens = serializers.IntegerField(allow_null=True)
    training_file = serializers.CharField(allow_null=True)
    validation_file = serializers.CharField(allow_null=True)
    estimated_finish = serializers.IntegerField(allow_null=True)
    integrations = serializers.ListField(child=serializers.JSONField(), allow_null=True)
    metadata = serializers.DictField(child=serializers.CharField(), allow_null=True)
    method = serializers.JSONField()
    user_provided_suffix = serializers.CharField(allow_null=True)
    stage = serializers.CharField(allow_blank=True, help_text="Extension: extracting|training")
    progress = serializers.FloatField(help_text="Extension: 0..1 within the job")
    kind = serializers.ChoiceField(choices=ADAPTER_KINDS, help_text="Extension: adapter kind")
    preset = serializers.CharField(allow_null=True, help_text="Extension: the preset, if any")
    carry_on = serializers.JSONField(help_text="Extension: the carry-on options ({} for a tail)")
    tail = serializers.JSONField(help_text="Extension: the tail options ({} for a carry-on)")
    parent_model = serializers.CharField(
        allow_null=True,
        help_text="Extension: the fine-tuned model this job continues (then also its "
        "'model'), or null for a job on a base",
    )


def job_object(job: FineTuningJob) -> dict[str, Any]:
    fine_tuned = job.fine_tuned_model if job.status == FineTuningJob.Status.SUCCEEDED else None
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": unix(job.created_at),
        "error": error_object(job.error),
        "fine_tuned_model": fine_tuned,
        "finished_at": unix(job.finished_at),
        "hyperparameters": dict(job.hyperparameters),
        "model": job.parent_model or job.base.name,
        "organization_id": f"user-{job.owner_id}",
        "result_files": [],
        "seed": job.seed,
        "status": job.status,
        "trained_tokens": job.trained_tokens,
        "training_file": job.training_file_id,
        "validation_file": job.validation_file_id,
        "estimated_finish": None,
        "integrations": None,
        "metadata": job.metadata or None,
        "method": {
            "type": "supervised",
            "supervised": {"hyperparameters": dict(job.hyperparameters)},
        },
        "user_provided_suffix": job.suffix or None,
        "stage": job.stage,
        "progress": job.progress,
        "kind": job.kind,
        "preset": job.preset or None,
        "carry_on": job.carry_on,
        "tail": job.tail,
        "parent_model": job.parent_model or None,
    }


_METADATA_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _metadata_filters(request: Request) -> dict[str, Any]:
    """``?metadata[key]=value`` filters, as OpenAI's list endpoint accepts.

    ``__exact`` makes the key a JSON key, never a lookup (``metadata[contains]``).
    """
    filters = {}
    for name, value in request.query_params.items():
        if not (name.startswith("metadata[") and name.endswith("]")):
            continue
        key = name[len("metadata[") : -1]
        if not _METADATA_KEY.match(key) or "__" in key:
            raise ApplicationError(
                "metadata filter keys are 1 to 64 letters, digits, '.', '-' or '_'",
                param="metadata",
            )
        filters[f"metadata__{key}__exact"] = value
    return filters


class JobListCreateApi(ApiView):
    @extend_schema(
        operation_id="createFineTuningJob",
        summary="Train an adapter (a carry-on or a tail) on a validated file; extraction is "
        "cached per dataset",
        request=JobCreateSerializer,
        responses={200: JobSerializer, **ERRORS},
    )
    def post(self, request: Request) -> Response:
        form = JobCreateSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        data = form.validated_data
        job = job_create(
            user=request.user,
            model=data["model"],
            training_file=data["training_file"],
            validation_file=data.get("validation_file"),
            hyperparameters=data.get("hyperparameters"),
            suffix=data.get("suffix"),
            seed=data.get("seed"),
            metadata=data.get("metadata"),
            carry_on=data.get("carry_on"),
            preset=data.get("preset"),
            tail=data.get("tail"),
        )
        return Response(job_object(job))

    @extend_schema(
        operation_id="listPaginatedFineTuningJobs",
        parameters=LIST_PARAMETERS,
        responses={200: list_of(JobSerializer, "FineTuningJobList"), **ERRORS},
    )
    def get(self, request: Request) -> Response:
        rows = selectors.job_list(user=request.user, filters=_metadata_filters(request))
        return Response(paginate(request, rows, job_object))


class JobDetailApi(ApiView):
    @extend_schema(operation_id="retrieveFineTuningJob", responses={200: JobSerializer, **ERRORS})
    def get(self, request: Request, job_id: str) -> Response:
        return Response(job_object(selectors.job_get(user=request.user, job_id=job_id)))


class JobCancelApi(ApiView):
    @extend_schema(
        operation_id="cancelFineTuningJob",
        request=None,
        responses={200: JobSerializer, 409: ErrorSerializer, **ERRORS},
    )
    def post(self, request: Request, job_id: str) -> Response:
        job = selectors.job_get(user=request.user, job_id=job_id)
        return Response(job_object(job_cancel(job=job, user=request.user)))


class JobEventSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField(help_text="Always 'fine_tuning.job.event'.")
    created_at = serializers.IntegerField()
    level = serializers.ChoiceField(choices=["info", "warn", "error"])
    message = serializers.CharField()
    data = serializers.JSONField(allow_null=True)
    type = serializers.ChoiceField(choices=["message", "metrics"])


def event_object(event: Any) -> dict[str, Any]:
    return {
        "id": event.id,
        "object": "fine_tuning.job.event",
        "created_at": unix(event.created_at),
        "level": event.level,
        "message": event.message,
        "data": event.data or None,
        "type": event.type,
    }


class JobEventListApi(ApiView):
    @extend_schema(
        operation_id="listFineTuningEvents",
        parameters=LIST_PARAMETERS,
        responses={200: list_of(JobEventSerializer, "FineTuningJobEventList"), **ERRORS},
    )
    def get(self, request: Request, job_id: str) -> Response:
        rows = selectors.job_event_list(user=request.user, job_id=job_id)
        return Response(paginate(request, rows, event_object, order=("-seq", "-pk")))


class CheckpointSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField(help_text="Always 'fine_tuning.job.checkpoint'.")
    created_at = serializers.IntegerField()
    fine_tuned_model_checkpoint = serializers.CharField()
    fine_tuning_job_id = serializers.CharField()
    metrics = serializers.JSONField()
    step_number = serializers.IntegerField()


def checkpoint_object(checkpoint: Checkpoint) -> dict[str, Any]:
    metrics = checkpoint.metrics or {}
    return {
        "id": checkpoint.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": unix(checkpoint.created_at),
        "fine_tuned_model_checkpoint": checkpoint.model_name,
        "fine_tuning_job_id": checkpoint.job_id,
        "metrics": {
            "step": checkpoint.step,
            "train_loss": metrics.get("train_loss"),
            "train_mean_token_accuracy": metrics.get("token_accuracy"),
            "valid_loss": metrics.get("valid_loss"),
            "valid_mean_token_accuracy": metrics.get("valid_token_accuracy"),
            "full_valid_loss": metrics.get("valid_loss"),
            "full_valid_mean_token_accuracy": metrics.get("valid_token_accuracy"),
        },
        "step_number": checkpoint.step,
    }


class JobCheckpointListApi(ApiView):
    @extend_schema(
        operation_id="listFineTuningJobCheckpoints",
        parameters=LIST_PARAMETERS,
        responses={200: list_of(CheckpointSerializer, "FineTuningJobCheckpointList"), **ERRORS},
    )
    def get(self, request: Request, job_id: str) -> Response:
        rows = selectors.checkpoint_list(user=request.user, job_id=job_id).select_related(
            "job__base", "job__owner"
        )
        return Response(paginate(request, rows, checkpoint_object, order=("-step", "-pk")))
