"""Usage in the admin: every record, read-only, filtered by user, adapter, outcome, model
and date, with a per-user and model summary of whatever the filters select."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest, HttpResponse

from webapp.usage.models import UsageRecord
from webapp.usage.selectors import usage_summary

SUMMARY_ROWS = 200


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    list_display = (
        "created_at", "user", "model", "adapter", "api_key", "outcome", "prompt_tokens",
        "completion_tokens", "time_to_first_token", "duration",
    )  # fmt: skip
    list_filter = (
        "outcome",
        ("user", admin.RelatedOnlyFieldListFilter),
        ("adapter", admin.RelatedOnlyFieldListFilter),
        "created_at",
    )
    search_fields = ("user__username", "model", "api_key__prefix")
    date_hierarchy = "created_at"
    list_select_related = ("user", "adapter", "api_key")
    ordering = ("-created_at",)
    show_full_result_count = False  # counting a large table on every page is slow

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # written by the serving layer only

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # history: view-only

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        response = super().changelist_view(request, extra_context)
        context = getattr(response, "context_data", None)
        if context and "cl" in context:  # not on a redirect or an error page
            context["usage_summary"] = usage_summary(records=context["cl"].queryset)[:SUMMARY_ROWS]
        return response
