"""Every route of the OpenAI-compatible API, mounted at /v1 (see README "API")."""

from django.urls import path, re_path
from drf_spectacular.views import SpectacularJSONAPIView

from webapp.core.api.errors import not_found
from webapp.customizations.apis import files, jobs, models
from webapp.evaluations import apis as evaluations
from webapp.serving import apis as serving
from webapp.usage import apis as usage

urlpatterns = [
    path("files", files.FileListCreateApi.as_view(), name="api-files"),
    path("files/<str:file_id>", files.FileDetailApi.as_view(), name="api-file"),
    path(
        "files/<str:file_id>/content",
        files.FileContentApi.as_view(),
        name="api-file-content",
    ),
    path("fine_tuning/jobs", jobs.JobListCreateApi.as_view(), name="api-jobs"),
    path("fine_tuning/jobs/<str:job_id>", jobs.JobDetailApi.as_view(), name="api-job"),
    path(
        "fine_tuning/jobs/<str:job_id>/cancel",
        jobs.JobCancelApi.as_view(),
        name="api-job-cancel",
    ),
    path(
        "fine_tuning/jobs/<str:job_id>/events",
        jobs.JobEventListApi.as_view(),
        name="api-job-events",
    ),
    path(
        "fine_tuning/jobs/<str:job_id>/checkpoints",
        jobs.JobCheckpointListApi.as_view(),
        name="api-job-checkpoints",
    ),
    path("models", models.ModelListApi.as_view(), name="api-models"),
    path("models/<path:model>", models.ModelDetailApi.as_view(), name="api-model"),
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
