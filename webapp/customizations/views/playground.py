"""The playground: streamed by the page's script over /v1, one plain answer without it."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_http_methods

from webapp.core.exceptions import ApplicationError
from webapp.customizations import selectors
from webapp.customizations.forms import PlaygroundForm
from webapp.customizations.services.examples import example_prompts
from webapp.customizations.views.common import bound


@login_required
@require_http_methods(["GET", "POST"])
def playground(request: HttpRequest) -> HttpResponse:
    """Chat with a base or an adapter; streamed by the page's script, plain without it."""
    from webapp.serving.services import ChatRequest, chat_completion_submit

    models = selectors.playground_models(user=request.user)
    chosen = request.GET.get("model") or (models.adapters[0].name if models.adapters else "")
    initial = {"model": chosen, "prompt": request.GET.get("prompt", "")}
    form = PlaygroundForm(*bound(request), initial=initial)
    answers: list[dict[str, Any]] = []
    status = 200
    if request.method == "POST" and form.is_valid():
        try:
            submitted = [
                chat_completion_submit(
                    user=request.user,
                    request=ChatRequest(
                        model=name,
                        messages=form.messages(),
                        temperature=form.cleaned_data["temperature"],
                        top_p=form.cleaned_data["top_p"],
                        max_tokens=form.cleaned_data["max_tokens"],
                    ),
                )
                for name in form.models()
            ]
            # Submitted together, decoded together: the engine batches them.
            answers = [
                {"model": s.model.name, "text": s.completion.result()[0][0]} for s in submitted
            ]
        except ApplicationError as exc:
            form.add_error(None, exc.message)
            status = exc.status
    elif request.method == "POST":
        status = 400
    base_default = selectors.base_model_default()
    chosen = form["model"].value() or chosen
    compare = form["compare_model"].value() or (base_default.name if base_default else "")
    context = {
        "form": form,
        "models": models,
        "chosen": chosen,
        "compare_default": compare,
        "panes": [
            {"title": chosen, "answer": answers[0] if answers else None, "hidden": False},
            {
                "title": compare,
                "answer": answers[1] if len(answers) > 1 else None,
                "hidden": len(answers) < 2,
            },
        ],
        "side_by_side": len(answers) > 1,
        "suggestions": example_prompts(
            adapter=next((a for a in models.adapters if a.name == chosen), None)
        ),
        "sampling_fields": [form["temperature"], form["top_p"], form["max_tokens"]],
    }
    return render(request, "customizations/playground.html", context, status=status)
