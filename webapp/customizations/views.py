"""Browser pages: upload a dataset, read its validation report, start and watch a job.

Each view parses input, calls one service or selector and renders; no business rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from webapp.core.exceptions import ApplicationError, NotFoundError
from webapp.customizations import selectors
from webapp.customizations.charts import loss_curve_svg
from webapp.customizations.forms import FileUploadForm, JobCreateForm
from webapp.customizations.services.files import file_create
from webapp.customizations.services.jobs import job_cancel, job_create

T = TypeVar("T")


@login_required
@require_http_methods(["GET", "POST"])
def file_list(request: HttpRequest) -> HttpResponse:
    form = FileUploadForm(request.POST or None, request.FILES or None)
    status = 200
    if request.method == "POST":
        if form.is_valid():
            try:
                file = file_create(user=request.user, upload=form.cleaned_data["file"])
            except ApplicationError as exc:
                form.add_error("file", exc.message)
                status = exc.status
            else:
                return redirect("file_detail", file_id=file.id)
        else:
            status = 400
    context = {
        "form": form,
        "files": selectors.file_list(user=request.user)[:50],
        "jobs": selectors.job_list(user=request.user)[:50],
    }
    return render(request, "customizations/file_list.html", context, status=status)


@login_required
@require_GET
def file_detail(request: HttpRequest, file_id: str) -> HttpResponse:
    file = _get_or_404(lambda: selectors.file_get(user=request.user, file_id=file_id))
    form = JobCreateForm(user=request.user, exclude_file=file.id)
    return render(request, "customizations/file_detail.html", {"file": file, "form": form})


@login_required
@require_POST
def job_create_view(request: HttpRequest, file_id: str) -> HttpResponse:
    file = _get_or_404(lambda: selectors.file_get(user=request.user, file_id=file_id))
    form = JobCreateForm(request.POST, user=request.user, exclude_file=file.id)
    if form.is_valid():
        try:
            job = job_create(
                user=request.user,
                model=form.cleaned_data["model"],
                training_file=file.id,
                validation_file=form.cleaned_data["validation_file"] or None,
                hyperparameters=form.hyperparameters(),
                suffix=form.cleaned_data["suffix"] or None,
                seed=form.cleaned_data["seed"],
            )
        except ApplicationError as exc:
            form.add_error(None, exc.message)
        else:
            return redirect("job_detail", job_id=job.id)
    context = {"file": file, "form": form}
    return render(request, "customizations/file_detail.html", context, status=400)


@login_required
@require_GET
def job_detail(request: HttpRequest, job_id: str) -> HttpResponse:
    job = _get_or_404(lambda: selectors.job_get(user=request.user, job_id=job_id))
    context = {
        "job": job,
        "events": job.events.order_by("-seq")[:200],
        "checkpoints": job.checkpoints.order_by("step"),
        "loss_curve": loss_curve_svg(selectors.job_loss_curve(job=job)),
    }
    return render(request, "customizations/finetuningjob_detail.html", context)


@login_required
@require_POST
def job_cancel_view(request: HttpRequest, job_id: str) -> HttpResponse:
    job = _get_or_404(lambda: selectors.job_get(user=request.user, job_id=job_id))
    try:
        job_cancel(job=job, user=request.user)
    except ApplicationError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, "The job was cancelled.")
    return redirect("job_detail", job_id=job.id)


def _get_or_404(fetch: Callable[[], T]) -> T:
    try:
        return fetch()
    except NotFoundError as exc:
        raise Http404(exc.message) from None
