"""Every route of the OpenAI-compatible API, mounted at /v1 (see README "API")."""

from django.urls import path, re_path
from drf_spectacular.views import SpectacularJSONAPIView

from webapp.core.api import not_found
from webapp.customizations import apis as customizations
from webapp.evaluations import apis as evaluations
from webapp.serving import apis as serving
from webapp.usage import apis as usage

urlpatterns = [
    path("files", customizations.FileListCreateApi.as_view(), name="api-files"),
    path("files/<str:file_id>", customizations.FileDetailApi.as_view(), name="api-file"),
    path(
        "files/<str:file_id>/content",
        customizations.FileContentApi.as_view(),
        name="api-file-content",
    ),
    path("fine_tuning/jobs", customizations.JobListCreateApi.as_view(), name="api-jobs"),
    path("fine_tuning/jobs/<str:job_id>", customizations.JobDetailApi.as_view(), name="api-job"),
    path(
        "fine_tuning/jobs/<str:job_id>/cancel",
        customizations.JobCancelApi.as_view(),
        name="api-job-cancel",
    ),
    path(
        "fine_tuning/jobs/<str:job_id>/events",
        customizations.JobEventListApi.as_view(),
        name="api-job-events",
    ),
    path(
        "fine_tuning/jobs/<str:job_id>/checkpoints",
        customizations.JobCheckpointListApi.as_view(),
        name="api-job-checkpoints",
    ),
    path("models", customizations.ModelListApi.as_view(), name="api-models"),
    path("models/<path:model>", customizations.ModelDetailApi.as_view(), name="api-model"),
    path("chat/completions", serving.ChatCompletionCreateApi.as_view(), name="api-chat"),
    path("evaluations", evaluations.EvaluationListCreateApi.as_view(), name="api-evaluations"),
    path(
        "evaluations/<str:evaluation_id>",
        evaluations.EvaluationDetailApi.as_view(),
        name="api-evaluation",
    ),
    path(
        "evaluations/<str:evaluation_id>/cancel",
        evaluations.EvaluationCancelApi.as_view(),
        name="api-evaluation-cancel",
    ),
    path("usage", usage.UsageListApi.as_view(), name="api-usage"),
    path("openapi.json", SpectacularJSONAPIView.as_view(), name="api-schema"),
    re_path(r"^[\s\S]*$", not_found),  # any path, newlines included: JSON, never HTML
]
