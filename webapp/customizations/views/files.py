"""Dataset pages: the dashboard (with the upload form), the list, and one file's report."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from webapp.core.exceptions import ApplicationError
from webapp.customizations import selectors
from webapp.customizations.estimates import file_job_estimate
from webapp.customizations.forms import FileUploadForm
from webapp.customizations.services.examples import example_dataset_list, example_file_create
from webapp.customizations.services.files import file_create
from webapp.customizations.services.jobs import MIN_TRAINING_EXAMPLES
from webapp.customizations.views.common import bound, get_or_404


def _upload(
    request: HttpRequest, template: str, context: Callable[[], dict[str, Any]]
) -> HttpResponse:
    """GET: the page; POST: store and validate the upload, then show its report.

    The page's script sends the same form with ``Accept: application/json`` (to draw an
    upload progress bar) and gets ``{"redirect": url}`` or ``{"errors": [...]}`` back.
    """
    form = FileUploadForm(*bound(request))
    status = 200
    if request.method == "POST":
        if form.is_valid():
            try:
                file = file_create(user=request.user, upload=form.cleaned_data["file"])
            except ApplicationError as exc:
                form.add_error("file", exc.message)
                status = exc.status
            else:
                url = reverse("file_detail", args=[file.id])
                if _wants_json(request):
                    return JsonResponse({"redirect": url, "status": file.status})
                return redirect(url)
        else:
            status = 400
        if _wants_json(request):
            return JsonResponse({"errors": form.errors.get("file", [])}, status=status)
    context_data = {"form": form, "examples": example_dataset_list(), **context()}
    return render(request, template, context_data, status=status)


def _wants_json(request: HttpRequest) -> bool:
    return "application/json" in request.headers.get("accept", "")


@login_required
@require_http_methods(["GET", "POST"])
def dashboard(request: HttpRequest) -> HttpResponse:
    return _upload(
        request,
        "customizations/dashboard.html",
        lambda: {"dashboard": selectors.dashboard_get(user=request.user)},
    )


@login_required
@require_http_methods(["GET", "POST"])
def file_list(request: HttpRequest) -> HttpResponse:
    return _upload(
        request,
        "customizations/file_list.html",
        lambda: {"files": selectors.file_list(user=request.user)[:200]},
    )


@login_required
@require_GET
def file_detail(request: HttpRequest, file_id: str) -> HttpResponse:
    file = get_or_404(lambda: selectors.file_get(user=request.user, file_id=file_id))
    context = {
        "file": file,
        "preview": selectors.file_preview(file=file),
        "estimate": file_job_estimate(file=file, base=selectors.base_model_default()),
        "min_examples": MIN_TRAINING_EXAMPLES,
    }
    return render(request, "customizations/file_detail.html", context)


@login_required
@require_POST
def file_example_create(request: HttpRequest) -> HttpResponse:
    """ "Try one": store a generated example dataset as an upload, then show its report."""
    try:
        file = example_file_create(user=request.user, name=request.POST.get("example", ""))
    except ApplicationError as exc:
        return HttpResponse(exc.message, status=exc.status, content_type="text/plain")
    return redirect("file_detail", file.id)
