"""The admin: every record, read-only metrics and artifacts, and the operator's actions.

Actions and deletes go through services, so artifacts are removed with their rows and job
transitions follow the status machine.
"""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin, messages
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.utils.html import format_html

from webapp.core.exceptions import ApplicationError
from webapp.customizations.charts import loss_curve_svg
from webapp.customizations.models import (
    Adapter,
    BaseModel,
    Checkpoint,
    FeatureSet,
    File,
    FineTuningJob,
    JobEvent,
)
from webapp.customizations.selectors import job_loss_curve
from webapp.customizations.services.adapters import (
    adapter_delete,
    adapter_set_active,
    feature_set_delete,
)
from webapp.customizations.services.base_models import (
    base_model_set_default,
    base_model_set_enabled,
)
from webapp.customizations.services.files import file_delete
from webapp.customizations.services.jobs import job_cancel, job_delete, job_retry


def _pretty_json(value: Any) -> str:
    return format_html("<pre>{}</pre>", json.dumps(value, indent=2, sort_keys=True))


def _run(admin_: admin.ModelAdmin, request: HttpRequest, objects: Any, action: Any) -> None:
    """Apply a service to each object, reporting successes and refusals."""
    done, refused = 0, []
    for obj in objects:
        try:
            action(obj)
        except ApplicationError as exc:
            refused.append(f"{obj}: {exc.message}")
        else:
            done += 1
    if done:
        admin_.message_user(request, f"Done for {done} record(s).", messages.SUCCESS)
    for line in refused:
        admin_.message_user(request, line, messages.WARNING)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Records written by the pipeline: visible, never edited by hand."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_operate_permission(self, request: HttpRequest) -> bool:
        """State-changing actions (cancel, retry, (de)activate) need the model's change
        permission, which the records themselves never use (no form edits them)."""
        opts = self.opts
        return bool(request.user.has_perm(f"{opts.app_label}.change_{opts.model_name}"))


class ClaimedWorkAdmin(ReadOnlyAdmin):
    """Work a worker runs (fine-tuning jobs, evaluations): its progress and its error."""

    @admin.display(description="progress")
    def progress_percent(self, obj: Any) -> str:
        return f"{obj.progress:.0%}"

    @admin.display(description="error")
    def error_pretty(self, obj: Any) -> str:
        return _pretty_json(obj.error) if obj.error else "—"


@admin.register(BaseModel)
class BaseModelAdmin(admin.ModelAdmin):
    list_display = ("name", "source_type", "source", "revision", "enabled", "is_default")
    list_filter = ("enabled", "is_default", "source_type")
    search_fields = ("name", "source", "fingerprint_key")
    readonly_fields = ("fingerprint_pretty", "fingerprint_key", "created_at", "updated_at")
    exclude = ("fingerprint",)
    actions = ["enable", "disable", "make_default"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # registering needs the model loaded: manage.py register_base_model

    @admin.display(description="fingerprint")
    def fingerprint_pretty(self, obj: BaseModel) -> str:
        return _pretty_json(obj.fingerprint)

    @admin.action(description="Enable selected base models", permissions=["change"])
    def enable(self, request: HttpRequest, queryset: QuerySet[BaseModel]) -> None:
        _run(self, request, queryset, lambda b: base_model_set_enabled(base=b, enabled=True))

    @admin.action(description="Disable selected base models", permissions=["change"])
    def disable(self, request: HttpRequest, queryset: QuerySet[BaseModel]) -> None:
        _run(self, request, queryset, lambda b: base_model_set_enabled(base=b, enabled=False))

    @admin.action(description="Make the selected base model the default", permissions=["change"])
    def make_default(self, request: HttpRequest, queryset: QuerySet[BaseModel]) -> None:
        _run(self, request, queryset[:1], lambda b: base_model_set_default(base=b))


@admin.register(File)
class FileAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "owner",
        "filename",
        "status",
        "format",
        "n_examples",
        "n_tokens",
        "bytes",
        "created_at",
    )
    list_filter = ("status", "format", "purpose", "created_at")
    search_fields = ("id", "filename", "sha256", "owner__username")
    readonly_fields = ("report_pretty",)
    exclude = ("report",)
    actions = ["delete_with_artifacts"]

    @admin.display(description="validation report")
    def report_pretty(self, obj: File) -> str:
        return _pretty_json(obj.report)

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # it would skip artifact removal
        return actions

    @admin.action(
        description="Delete selected files and their stored content", permissions=["delete"]
    )
    def delete_with_artifacts(self, request: HttpRequest, queryset: QuerySet[File]) -> None:
        _run(self, request, list(queryset), lambda f: file_delete(file=f))

    def delete_model(self, request: HttpRequest, obj: File) -> None:
        file_delete(file=obj)


@admin.register(FeatureSet)
class FeatureSetAdmin(ReadOnlyAdmin):
    list_display = ("key", "base", "status", "n_examples", "n_tokens", "bytes", "created_at")
    list_filter = ("status", "base")
    search_fields = ("key", "dataset_sha256")
    actions = ["delete_with_artifacts"]

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions

    @admin.action(
        description="Delete selected feature sets and their cached states",
        permissions=["delete"],
    )
    def delete_with_artifacts(self, request: HttpRequest, queryset: QuerySet[FeatureSet]) -> None:
        _run(self, request, list(queryset), lambda fs: feature_set_delete(feature_set=fs))

    def delete_model(self, request: HttpRequest, obj: FeatureSet) -> None:
        feature_set_delete(feature_set=obj)


class JobEventInline(admin.TabularInline):
    model = JobEvent
    fields = ("created_at", "level", "type", "message", "data")
    readonly_fields = fields
    ordering = ("-seq",)
    extra = 0
    can_delete = False
    max_num = 0
    show_change_link = False

    def get_queryset(self, request: HttpRequest) -> QuerySet[JobEvent]:
        # Per-step metrics would drown the page (the loss curve shows them); epoch
        # summaries stay.
        per_step = Q(type=JobEvent.Type.METRICS) & ~Q(data__has_key="epoch_train_loss")
        return super().get_queryset(request).exclude(per_step)


class CheckpointInline(admin.TabularInline):
    model = Checkpoint
    fields = ("id", "step", "metrics", "path", "sha256", "bytes", "created_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    max_num = 0


@admin.register(FineTuningJob)
class FineTuningJobAdmin(ClaimedWorkAdmin):
    list_display = (
        "id",
        "owner",
        "base",
        "kind",
        "preset",
        "parent_model",
        "status",
        "stage",
        "progress_percent",
        "trained_tokens",
        "created_at",
        "finished_at",
    )
    list_filter = ("status", "kind", "preset", "stage", "base", "created_at")
    list_select_related = ("owner", "base")
    search_fields = ("id", "suffix", "owner__username", "training_file__id", "parent_model")
    readonly_fields = ("loss_curve", "error_pretty", "adapter_link")
    exclude = ("error",)
    inlines = [CheckpointInline, JobEventInline]
    actions = ["cancel", "retry"]

    @admin.display(description="loss curve")
    def loss_curve(self, obj: FineTuningJob) -> str:
        return loss_curve_svg(job_loss_curve(job=obj)) or "—"

    @admin.display(description="adapter")
    def adapter_link(self, obj: FineTuningJob) -> str:
        return obj.fine_tuned_model or "—"

    @admin.action(description="Cancel selected jobs", permissions=["operate"])
    def cancel(self, request: HttpRequest, queryset: QuerySet[FineTuningJob]) -> None:
        _run(self, request, queryset, lambda j: job_cancel(job=j, user=request.user))

    @admin.action(description="Retry selected failed jobs", permissions=["operate"])
    def retry(self, request: HttpRequest, queryset: QuerySet[FineTuningJob]) -> None:
        _run(self, request, queryset, lambda j: job_retry(job=j))

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions

    def delete_model(self, request: HttpRequest, obj: FineTuningJob) -> None:
        job_delete(job=obj)


@admin.register(JobEvent)
class JobEventAdmin(ReadOnlyAdmin):
    list_display = ("id", "job", "created_at", "level", "type", "message")
    list_filter = ("level", "type")
    search_fields = ("id", "job__id", "message")

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Checkpoint)
class CheckpointAdmin(ReadOnlyAdmin):
    list_display = ("id", "job", "step", "bytes", "created_at")
    search_fields = ("id", "job__id")

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Adapter)
class AdapterAdmin(ReadOnlyAdmin):
    list_display = (
        "name",
        "label",
        "owner",
        "base",
        "kind",
        "depth",
        "preset",
        "parent",
        "active",
        "n_parameters",
        "bytes",
        "created_at",
    )
    list_filter = ("active", "kind", "preset", "base", "created_at")
    list_select_related = ("owner", "base", "parent")
    search_fields = ("name", "label", "owner__username", "job__id", "sha256", "parent__name")
    readonly_fields = ("metrics_pretty",)
    exclude = ("metrics",)
    actions = ["activate", "deactivate", "delete_with_artifacts"]

    @admin.display(description="metrics")
    def metrics_pretty(self, obj: Adapter) -> str:
        return _pretty_json(obj.metrics)

    @admin.action(description="Activate selected adapters", permissions=["operate"])
    def activate(self, request: HttpRequest, queryset: QuerySet[Adapter]) -> None:
        _run(self, request, queryset, lambda a: adapter_set_active(adapter=a, active=True))

    @admin.action(description="Deactivate selected adapters", permissions=["operate"])
    def deactivate(self, request: HttpRequest, queryset: QuerySet[Adapter]) -> None:
        _run(self, request, queryset, lambda a: adapter_set_active(adapter=a, active=False))

    @admin.action(
        description="Delete selected adapters and their artifacts", permissions=["delete"]
    )
    def delete_with_artifacts(self, request: HttpRequest, queryset: QuerySet[Adapter]) -> None:
        _run(self, request, list(queryset), lambda a: adapter_delete(adapter=a))

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)
        return actions

    def delete_model(self, request: HttpRequest, obj: Adapter) -> None:
        adapter_delete(adapter=obj)
