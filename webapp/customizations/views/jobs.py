"""Job pages: the list, the new-job form and its estimate, one job (live), cancel, retry."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from webapp.core.exceptions import ApplicationError
from webapp.customizations import selectors
from webapp.customizations.charts import loss_curve_svg
from webapp.customizations.estimates import duration_text, file_job_estimate, preset_estimates
from webapp.customizations.forms import EstimateQuery, JobCreateForm, held_out_text
from webapp.customizations.models import FineTuningJob
from webapp.customizations.services.jobs import CANCELLABLE, job_cancel, job_create, job_retry
from webapp.customizations.views.common import bound, get_or_404


@login_required
@require_GET
def job_list(request: HttpRequest) -> HttpResponse:
    jobs = selectors.job_list(user=request.user)[:200]
    return render(request, "customizations/finetuningjob_list.html", {"jobs": jobs})


@login_required
@require_http_methods(["GET", "POST"])
def job_new(request: HttpRequest) -> HttpResponse:
    """The new-job page; ``?training_file=`` preselects a dataset, ``?model=`` a base or
    one of the user's adapters to continue."""
    initial = {"training_file": request.GET.get("training_file", "")}
    if request.GET.get("model"):  # e.g. an adapter's "Continue training"
        initial["model"] = request.GET["model"]
    form = JobCreateForm(*bound(request), user=request.user, initial=initial)
    return _job_form(request, form)


@login_required
@require_POST
def job_create_view(request: HttpRequest, file_id: str) -> HttpResponse:
    """The same form with the dataset fixed by the URL (the dataset page's form)."""
    file = get_or_404(lambda: selectors.file_get(user=request.user, file_id=file_id))
    form = JobCreateForm(request.POST, user=request.user, training_file=file)
    return _job_form(request, form)


def _job_form(request: HttpRequest, form: JobCreateForm) -> HttpResponse:
    if request.method == "POST" and form.is_valid():
        try:
            job = job_create(
                user=request.user,
                model=form.cleaned_data["model"],
                training_file=form.training_file_id(),
                validation_file=form.cleaned_data["validation_file"] or None,
                hyperparameters=form.hyperparameters(),
                carry_on=form.carry_on(),
                preset=form.preset_name(),
                tail=form.tail(),
                suffix=form.cleaned_data["suffix"] or None,
                seed=form.cleaned_data["seed"],
            )
        except ApplicationError as exc:
            form.add_error(None, exc.message)
        else:
            return redirect("job_detail", job_id=job.id)
    status = 400 if request.method == "POST" else 200
    selected = form["training_file"].value()
    file = form.files.get(str(selected)) if selected else None
    base = form.bases.get(str(form["model"].value() or ""))
    estimates = preset_estimates(file=file, base=base)
    preset = str(form["preset"].value() or "")
    if preset in estimates:
        estimate = estimates[preset]
    else:
        estimate = file_job_estimate(file=file, base=base) if file else None
    context = {
        "form": form,
        "estimate": estimate,
        "presets": [
            (radio, summary, kind, estimates.get(str(radio.data["value"])))
            for radio, summary, kind in form.preset_options()
        ],
        "has_files": bool(form.files),
    }
    return render(request, "customizations/finetuningjob_form.html", context, status=status)


@login_required
@require_GET
def job_estimate(request: HttpRequest) -> JsonResponse:
    """``{"seconds", "text"}`` for the new-job form's current choices (null: unknown)."""
    query = EstimateQuery(request.GET)
    if not query.is_valid():
        return JsonResponse({"seconds": None, "text": None, "errors": query.errors}, status=400)
    data = query.cleaned_data
    file = get_or_404(lambda: selectors.file_get(user=request.user, file_id=data["training_file"]))
    bases = selectors.base_model_list()
    base = bases.filter(name=data["model"]).first() if data["model"] else None
    base = base or selectors.base_model_default()
    kind, depth = query.adapter_kind()
    estimate = file_job_estimate(
        file=file,
        base=base,
        epochs=data["n_epochs"],
        d_model=data["d_model"],
        n_blocks=data["n_blocks"],
        kind=kind,
        depth=depth,
    )
    presets = {
        name: each.text if each else None
        for name, each in preset_estimates(file=file, base=base, epochs=data["n_epochs"]).items()
    }
    if estimate is None:
        return JsonResponse({"seconds": None, "text": None, "presets": presets})
    return JsonResponse(
        {"seconds": round(estimate.seconds, 2), "text": estimate.text, "presets": presets}
    )


@login_required
@require_GET
def job_detail(request: HttpRequest, job_id: str) -> HttpResponse:
    page = get_or_404(lambda: selectors.job_page_get(user=request.user, job_id=job_id))
    return render(request, "customizations/finetuningjob_detail.html", _job_context(page))


@login_required
@require_GET
def job_live(request: HttpRequest, job_id: str) -> JsonResponse:
    """What the job page's script polls: the state and the curve and log, rendered.

    ``?after=<seq>`` (the ``last_seq`` of the previous answer): only the log rows added
    since then come back, as ``event_rows_html``, instead of the whole log.
    """
    after = _after_seq(request)
    page = get_or_404(
        lambda: selectors.job_page_get(user=request.user, job_id=job_id, after_seq=after)
    )
    context = _job_context(page)
    job = page.job
    last_seq = max([after or 0, *(event.seq for event in page.events)])
    if after is None:
        events = {"events_html": render_to_string(_EVENTS, context, request)}
    else:
        events = {"event_rows_html": render_to_string(_EVENT_ROWS, context, request)}
    return JsonResponse(
        {
            "status": job.status,
            "status_display": job.get_status_display(),
            "stage": job.stage,
            "cancellable": context["cancellable"],
            "retryable": context["retryable"],
            "terminal": job.is_terminal,
            "progress": job.progress,
            "percent": context["percent"],
            "eta": context["eta"],
            "elapsed": context["elapsed"],
            "curve_points": len(page.curve.points),
            "curve_html": render_to_string("customizations/_loss_curve.html", context, request),
            "last_seq": last_seq,
            **events,
        },
        headers={"cache-control": "no-store"},
    )


_EVENTS = "customizations/_job_events.html"
_EVENT_ROWS = "customizations/_job_event_rows.html"


def _after_seq(request: HttpRequest) -> int | None:
    value = request.GET.get("after", "")
    return int(value) if value.isdigit() and len(value) <= 20 else None


def _job_context(page: selectors.JobPage) -> dict[str, Any]:
    job = page.job
    return {
        "job": job,
        "page": page,
        "events": page.events,
        "checkpoints": page.checkpoints,
        "loss_curve": loss_curve_svg(page.curve.points, total_steps=page.curve.total_steps),
        "percent": int(job.progress * 100),  # floored: 100 only when done
        "eta": f"about {duration_text(page.eta_seconds)} left" if page.eta_seconds else "",
        "elapsed": duration_text(page.elapsed_seconds) if page.elapsed_seconds else "",
        "cancellable": job.status in CANCELLABLE,
        "retryable": job.status == FineTuningJob.Status.FAILED,
        "held_out": held_out_text(),
    }


@login_required
@require_POST
def job_cancel_view(request: HttpRequest, job_id: str) -> HttpResponse:
    job = get_or_404(lambda: selectors.job_get(user=request.user, job_id=job_id))
    try:
        job_cancel(job=job, user=request.user)
    except ApplicationError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, "The job was cancelled.")
    return redirect("job_detail", job_id=job.id)


@login_required
@require_POST
def job_retry_view(request: HttpRequest, job_id: str) -> HttpResponse:
    job = get_or_404(lambda: selectors.job_get(user=request.user, job_id=job_id))
    if job.status != FineTuningJob.Status.FAILED:
        messages.error(request, f"Only a failed job can be retried; this one is {job.status}.")
        return redirect("job_detail", job_id=job.id)
    try:
        job_retry(job=job)
    except ApplicationError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, "The job was retried; training resumes from its checkpoints.")
    return redirect("job_detail", job_id=job.id)
