"""URL routes: the browser pages, the admin, the OpenAI-compatible API under /v1."""

from django.contrib import admin
from django.http import HttpRequest, JsonResponse
from django.urls import include, path

from webapp.accounts.throttling import ThrottledLoginView
from webapp.metrics.views import metrics


def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/login/", ThrottledLoginView.as_view(), name="login"),
    path("accounts/", include("webapp.accounts.urls")),
    path("accounts/", include("django.contrib.auth.urls")),
    path("healthz", healthz, name="healthz"),
    path("metrics", metrics, name="metrics"),
    path("usage/", include("webapp.usage.urls")),
    path("v1/", include("webapp.api_urls")),
    path("", include("webapp.evaluations.urls")),
    path("", include("webapp.customizations.urls")),
]
