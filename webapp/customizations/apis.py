"""The OpenAI-compatible REST API for files, fine-tuning jobs and models.

Paths, object shapes and field names follow OpenAI's API so the official ``openai`` client
works unchanged; adapter options ride along as documented extension fields (``preset``,
``carry_on`` or ``tail`` on a job; ``kind``, ``depth`` and ``preset`` on a fine-tuned
model). Each view parses input, calls one service or selector, and serializes.
"""

from __future__ import annotations

import re
from typing import Any

from django.http import FileResponse, HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
)
from rest_framework import serializers
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response

from customization.config import TAIL_LEARNING_RATE
from customization.presets import ADAPTER_KINDS, PRESETS
from webapp.core.api import (
    ERRORS,
    LIST_PARAMETERS,
    ApiView,
    ErrorSerializer,
    error_object,
    list_of,
    paginate,
    refuse_unknown_fields,
    unix,
)
from webapp.core.exceptions import ApplicationError
from webapp.customizations import selectors
from webapp.customizations.models import Adapter, BaseModel, Checkpoint, File, FineTuningJob
from webapp.customizations.services.adapters import adapter_delete
from webapp.customizations.services.files import PURPOSES, file_create, file_delete, file_open
from webapp.customizations.services.jobs import (
    AUTO_HYPERPARAMETERS,
    BASE_LEARNING_RATE,
    HYPERPARAMETER_RANGES,
    job_cancel,
    job_create,
    job_model_name,
)


class DeletedSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField()
    deleted = serializers.BooleanField()


# -- files ----------------------------------------------------------------------------------------


class FileSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField(help_text="Always 'file'.")
    bytes = serializers.IntegerField()
    created_at = serializers.IntegerField()
    expires_at = serializers.IntegerField(allow_null=True)
    filename = serializers.CharField()
    purpose = serializers.CharField()
    status = serializers.ChoiceField(choices=["uploaded", "processed", "error"])
    status_details = serializers.CharField(allow_null=True)
    format = serializers.CharField(allow_blank=True, help_text="Extension: detected format.")
    n_examples = serializers.IntegerField(help_text="Extension: valid examples.")
    n_tokens = serializers.IntegerField(allow_null=True, help_text="Extension: total tokens.")


def file_object(file: File) -> dict[str, Any]:
    problems = file.problems
    details = None
    if problems:
        first = problems[0]
        where = f"line {first['line']}: " if first.get("line") else ""
        details = f"{where}{first['message']} ({len(problems)} problem(s))"
    return {
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": unix(file.created_at),
        "expires_at": None,
        "filename": file.filename,
        "purpose": file.purpose,
        "status": file.status,
        "status_details": details,
        "format": file.format,
        "n_examples": file.n_examples,
        "n_tokens": file.n_tokens,
    }


class FileUploadSerializer(serializers.Serializer):
    file = serializers.FileField(allow_empty_file=True)
    purpose = serializers.ChoiceField(choices=PURPOSES)


class FileListCreateApi(ApiView):
    parser_classes = [MultiPartParser, FormParser]

    @extend_schema(
        operation_id="createFile",
        summary="Upload a JSONL dataset; it is validated now (problems named by line)",
        request={"multipart/form-data": FileUploadSerializer},
        responses={200: FileSerializer, 413: ErrorSerializer, **ERRORS},
    )
    def post(self, request: Request) -> Response:
        form = FileUploadSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        file = file_create(
            user=request.user,
            upload=form.validated_data["file"],
            purpose=form.validated_data["purpose"],
            keep_invalid=False,
        )
        return Response(file_object(file))

    @extend_schema(
        operation_id="listFiles",
        parameters=[*LIST_PARAMETERS, OpenApiParameter("purpose", str)],
        responses={200: list_of(FileSerializer, "FileList"), **ERRORS},
    )
    def get(self, request: Request) -> Response:
        rows = selectors.file_list(user=request.user)
        purpose = request.query_params.get("purpose")
        if purpose:
            rows = rows.filter(purpose=purpose)
        return Response(paginate(request, rows, file_object))


class FileDetailApi(ApiView):
    @extend_schema(operation_id="retrieveFile", responses={200: FileSerializer, **ERRORS})
    def get(self, request: Request, file_id: str) -> Response:
        return Response(file_object(selectors.file_get(user=request.user, file_id=file_id)))

    @extend_schema(
        operation_id="deleteFile",
        responses={200: DeletedSerializer, 409: ErrorSerializer, **ERRORS},
    )
    def delete(self, request: Request, file_id: str) -> Response:
        file = selectors.file_get(user=request.user, file_id=file_id)
        file_delete(file=file)
        return Response({"id": file_id, "object": "file", "deleted": True})


class FileContentApi(ApiView):
    @extend_schema(
        operation_id="downloadFile",
        responses={
            (200, "application/octet-stream"): OpenApiResponse(OpenApiTypes.BINARY),
            **ERRORS,
        },
    )
    def get(self, request: Request, file_id: str) -> HttpResponse:
        file = selectors.file_get(user=request.user, file_id=file_id)
        # Streamed in blocks: a large upload is never held in memory whole.
        return FileResponse(
            file_open(file=file),
            content_type="application/octet-stream",
            as_attachment=True,
            filename=f"{file.id}.jsonl",
        )


# -- fine-tuning jobs ----------------------------------------------------------------------


def _range(name: str) -> str:
    """``"auto" (default N) or low..high``, from the service's own table."""
    _, low, high = HYPERPARAMETER_RANGES[name]
    return f'"auto" (default {AUTO_HYPERPARAMETERS[name]:g}) or {low:g}..{high:g}'


class HyperparametersSerializer(serializers.Serializer):
    n_epochs = serializers.JSONField(required=False, help_text=_range("n_epochs"))
    batch_size = serializers.JSONField(required=False, help_text=_range("batch_size"))
    learning_rate_multiplier = serializers.JSONField(
        required=False,
        help_text=f"{_range('learning_rate_multiplier')}: a multiplier of the base rate, a "
        f"carry-on's {BASE_LEARNING_RATE:g}, a tail's {TAIL_LEARNING_RATE:g}, or the preset's",
    )


class CarryOnOptionsSerializer(serializers.Serializer):
    """Extension: the carry-on's shape and extraction options (all optional)."""

    d_model = serializers.IntegerField(required=False)
    n_blocks = serializers.IntegerField(required=False)
    n_heads = serializers.IntegerField(required=False)
    mlp_ratio = serializers.FloatField(required=False)
    taps = serializers.JSONField(
        required=False, help_text='"auto" (the default ladder for the base) or layer indices'
    )
    tap_mode = serializers.CharField(required=False)
    alpha = serializers.FloatField(required=False)
    dropout = serializers.FloatField(required=False)
    max_length = serializers.JSONField(required=False)
    storage_dtype = serializers.CharField(required=False)
    checkpoint_every = serializers.JSONField(required=False)
    early_stopping_patience = serializers.IntegerField(required=False)


class TailOptionsSerializer(serializers.Serializer):
    """Extension: the tail's shape (LoRA on the base's top layers) and extras (all optional)."""

    depth = serializers.IntegerField(
        required=False, help_text="How many of the base's top layers the tail re-runs (1..L)"
    )
    rank = serializers.IntegerField(required=False, help_text="LoRA rank, 1..256")
    alpha = serializers.FloatField(required=False, help_text="LoRA alpha (scale alpha / rank)")
    target_modules = serializers.JSONField(
        required=False, help_text='"all-linear" or names among q_proj ... down_proj'
    )
    dropout = serializers.FloatField(required=False)
    max_length = serializers.JSONField(required=False)
    storage_dtype = serializers.CharField(required=False)
    checkpoint_every = serializers.JSONField(required=False)
    early_stopping_patience = serializers.IntegerField(required=False)


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
        "fine_tuned_model_checkpoint": checkpoint.model_name(job_model_name(checkpoint.job)),
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


# -- models ----------------------------------------------------------------------------------


class ModelSerializer(serializers.Serializer):
    id = serializers.CharField()
    object = serializers.CharField(help_text="Always 'model'.")
    created = serializers.IntegerField()
    owned_by = serializers.CharField()
    kind = serializers.ChoiceField(
        choices=ADAPTER_KINDS, required=False, help_text="Extension, fine-tuned models: kind"
    )
    depth = serializers.IntegerField(
        required=False, allow_null=True, help_text="Extension: a tail's depth (null: carry-on)"
    )
    preset = serializers.CharField(
        required=False, allow_null=True, help_text="Extension: the preset it was trained with"
    )


def base_object(base: BaseModel) -> dict[str, Any]:
    return {
        "id": base.name,
        "object": "model",
        "created": unix(base.created_at),
        "owned_by": "system",
    }


def adapter_object(adapter: Adapter) -> dict[str, Any]:
    return {
        "id": adapter.name,
        "object": "model",
        "created": unix(adapter.created_at),
        "owned_by": adapter.owner.username,
        "kind": adapter.kind,
        "depth": adapter.depth,
        "preset": adapter.preset or None,
    }


class ModelListSerializer(serializers.Serializer):
    object = serializers.CharField(help_text="Always 'list'.")
    data = ModelSerializer(many=True)


class ModelListApi(ApiView):
    @extend_schema(operation_id="listModels", responses={200: ModelListSerializer, **ERRORS})
    def get(self, request: Request) -> Response:
        bases = [base_object(b) for b in selectors.base_model_list()]
        adapters = selectors.adapter_list(user=request.user, active_only=True)
        owned = [adapter_object(a) for a in adapters.select_related("owner")]
        return Response({"object": "list", "data": bases + owned})


class ModelDetailApi(ApiView):
    @extend_schema(operation_id="retrieveModel", responses={200: ModelSerializer, **ERRORS})
    def get(self, request: Request, model: str) -> Response:
        resolved = selectors.model_resolve(user=request.user, name=model)
        if resolved.adapter_id is None:
            return Response(base_object(resolved.base))
        if resolved.adapter_id == model:  # an adapter (a checkpoint is named by its row's pk)
            return Response(adapter_object(selectors.adapter_get(user=request.user, name=model)))
        return Response(
            {"id": model, "object": "model", "created": unix(resolved.base.created_at),
             "owned_by": request.user.username}
        )  # fmt: skip

    @extend_schema(
        operation_id="deleteModel",
        responses={200: DeletedSerializer, 403: ErrorSerializer, **ERRORS},
    )
    def delete(self, request: Request, model: str) -> Response:
        if selectors.base_model_list(enabled_only=False).filter(name=model).exists():
            raise ApplicationError(
                f"'{model}' is a base model; only your fine-tuned models can be deleted",
                param="model",
                code="permission_denied",
                status=403,
            )
        adapter = selectors.adapter_get(user=request.user, name=model)
        adapter_delete(adapter=adapter)
        return Response({"id": model, "object": "model", "deleted": True})
