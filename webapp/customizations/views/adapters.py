"""Adapter pages: the list with metrics, rename, (de)activate, delete, download."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET, require_POST

from webapp.core.exceptions import ApplicationError
from webapp.customizations import selectors
from webapp.customizations.forms import AdapterRenameForm
from webapp.customizations.services.adapters import (
    adapter_bundle,
    adapter_bundle_filename,
    adapter_delete,
    adapter_rename,
    adapter_set_active,
)
from webapp.customizations.views.common import get_or_404


@login_required
@require_GET
def adapter_list(request: HttpRequest) -> HttpResponse:
    adapters = selectors.adapter_list(user=request.user).select_related("job", "parent")
    return render(request, "customizations/adapter_list.html", {"adapters": adapters})


@login_required
@require_POST
def adapter_rename_view(request: HttpRequest, adapter_id: int) -> HttpResponse:
    adapter = _get_adapter(request, adapter_id)
    form = AdapterRenameForm(request.POST)
    if not form.is_valid():
        messages.error(request, "A name is at most 100 characters.")
        return redirect("adapter_list")
    try:
        adapter_rename(adapter=adapter, label=form.cleaned_data["label"])
    except ApplicationError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Renamed to “{adapter.display_name}”.")
    return redirect("adapter_list")


@login_required
@require_POST
def adapter_active_view(request: HttpRequest, adapter_id: int) -> HttpResponse:
    adapter = _get_adapter(request, adapter_id)
    active = request.POST.get("active") == "1"
    adapter_set_active(adapter=adapter, active=active)
    state = "activated: it is served again" if active else "deactivated: it is no longer served"
    messages.success(request, f"“{adapter.display_name}” was {state}.")
    return redirect("adapter_list")


@login_required
@require_POST
def adapter_delete_view(request: HttpRequest, adapter_id: int) -> HttpResponse:
    adapter = _get_adapter(request, adapter_id)
    name = adapter.display_name
    adapter_delete(adapter=adapter)
    messages.success(request, f"“{name}” and its files were deleted.")
    return redirect("adapter_list")


@login_required
@require_GET
def adapter_download(request: HttpRequest, adapter_id: int) -> FileResponse:
    adapter = _get_adapter(request, adapter_id)
    try:
        bundle = adapter_bundle(adapter=adapter)
    except ApplicationError as exc:
        raise Http404(exc.message) from None
    return FileResponse(
        bundle,
        as_attachment=True,
        filename=adapter_bundle_filename(adapter),
        content_type="application/zip",
    )


def _get_adapter(request: HttpRequest, adapter_id: int) -> Any:
    return get_or_404(lambda: selectors.adapter_get_by_id(user=request.user, adapter_id=adapter_id))
