"""Evaluation pages: the list, the new-evaluation form, one evaluation (models side by side),
cancel. Each view parses input, calls one service or selector and renders; every page works
without JavaScript (a running evaluation's page refreshes itself until it ends)."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from webapp.core.exceptions import ApplicationError
from webapp.customizations.views.common import bound, get_or_404
from webapp.evaluations import selectors
from webapp.evaluations.charts import comparison_svg
from webapp.evaluations.forms import EvaluationCreateForm
from webapp.evaluations.services import evaluation_cancel, evaluation_create

# Seconds between reloads of a running evaluation's page.
REFRESH_SECONDS = 3


@login_required
@require_GET
def evaluation_list(request: HttpRequest) -> HttpResponse:
    evaluations = selectors.evaluation_list(user=request.user)[:200]
    return render(request, "evaluations/evaluation_list.html", {"evaluations": evaluations})


@login_required
@require_http_methods(["GET", "POST"])
def evaluation_new(request: HttpRequest) -> HttpResponse:
    """The form; ``?file=`` and ``?model=`` (repeatable) preselect."""
    files = selectors.evaluable_files(user=request.user)
    models = selectors.evaluable_models(user=request.user)
    initial = {"file": request.GET.get("file", ""), "models": request.GET.getlist("model")}
    form = EvaluationCreateForm(*bound(request), files=files, models=models, initial=initial)
    status = 200
    if request.method == "POST":
        status = 400
        if form.is_valid():
            try:
                evaluation = evaluation_create(
                    user=request.user,
                    file=form.cleaned_data["file"],
                    models=form.cleaned_data["models"],
                    **form.options(),
                )
            except ApplicationError as exc:
                form.add_error(exc.param if exc.param in form.fields else None, exc.message)
                status = exc.status
            else:
                return redirect("evaluation_detail", evaluation_id=evaluation.id)
    context = {"form": form, "has_files": bool(files)}
    return render(request, "evaluations/evaluation_form.html", context, status=status)


@login_required
@require_GET
def evaluation_detail(request: HttpRequest, evaluation_id: str) -> HttpResponse:
    page = get_or_404(
        lambda: selectors.evaluation_page_get(user=request.user, evaluation_id=evaluation_id)
    )
    context = {
        "evaluation": page.evaluation,
        "results": page.results,
        "problems": page.problems,
        "chart": comparison_svg(page.results),
        "percent": int(page.evaluation.progress * 100),
        "refresh": None if page.evaluation.is_terminal else REFRESH_SECONDS,
    }
    return render(request, "evaluations/evaluation_detail.html", context)


@login_required
@require_POST
def evaluation_cancel_view(request: HttpRequest, evaluation_id: str) -> HttpResponse:
    evaluation = get_or_404(
        lambda: selectors.evaluation_get(user=request.user, evaluation_id=evaluation_id)
    )
    try:
        evaluation_cancel(evaluation=evaluation)
    except ApplicationError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, "The evaluation was cancelled.")
    return redirect("evaluation_detail", evaluation_id=evaluation.id)
