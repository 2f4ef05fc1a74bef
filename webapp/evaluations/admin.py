"""Evaluations in the admin: read-only figures and chart, the error, and cancel."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from webapp.customizations.admin import ClaimedWorkAdmin, _run
from webapp.evaluations.charts import comparison_svg
from webapp.evaluations.models import Evaluation, EvaluationResult
from webapp.evaluations.services import evaluation_cancel


class EvaluationResultInline(admin.TabularInline):
    model = EvaluationResult
    fields = ("position", "model", "kind", "loss", "token_accuracy", "exact_match", "n_correct")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Evaluation)
class EvaluationAdmin(ClaimedWorkAdmin):
    list_display = (
        "id",
        "owner",
        "base",
        "filename",
        "n_models",
        "status",
        "progress_percent",
        "created_at",
        "finished_at",
    )
    list_filter = ("status", "base", "created_at")
    list_select_related = ("owner", "base")
    search_fields = ("id", "owner__username", "file__id", "filename", "results__model")
    readonly_fields = ("chart", "error_pretty")
    exclude = ("error", "problems")
    inlines = [EvaluationResultInline]
    actions = ["cancel"]

    @admin.display(description="models")
    def n_models(self, obj: Evaluation) -> int:
        return obj.results.count()

    @admin.display(description="models side by side")
    def chart(self, obj: Evaluation) -> str:
        return comparison_svg(list(obj.results.order_by("position"))) or "—"

    @admin.action(description="Cancel selected evaluations", permissions=["operate"])
    def cancel(self, request: HttpRequest, queryset: QuerySet[Evaluation]) -> None:
        _run(self, request, queryset, lambda e: evaluation_cancel(evaluation=e))
