"""Admin actions follow Django's permissions: view-only staff can look but not act."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib import admin
from django.contrib.auth.models import Permission
from django.test import Client, RequestFactory

from tests.factories import PASSWORD, UserFactory

pytestmark = pytest.mark.django_db


def _staff(*codenames_like: str) -> Any:
    user = UserFactory(is_staff=True)
    for like in codenames_like:
        user.user_permissions.add(*Permission.objects.filter(codename__startswith=like))
    return type(user).objects.get(pk=user.pk)  # fresh permission cache


def _actions(user: Any) -> dict[str, list[str]]:
    request = RequestFactory().get("/admin/")
    request.user = user
    return {
        model._meta.label: sorted(model_admin.get_actions(request))
        for model, model_admin in admin.site._registry.items()
    }


def test_a_view_only_staff_user_is_offered_no_action_anywhere() -> None:
    """With only view permissions, no model admin lists a single action."""
    offered = _actions(_staff("view_"))
    assert all(not names for names in offered.values()), offered


def test_actions_come_with_the_permissions_they_need() -> None:
    """Change permissions bring the state-changing actions, delete ones the deleting ones."""
    changer = _actions(_staff("view_", "change_"))
    assert changer["customizations.FineTuningJob"] == ["cancel", "retry"]
    assert changer["customizations.Adapter"] == ["activate", "deactivate"]
    assert changer["accounts.ApiKey"] == ["revoke"]
    deleter = _actions(_staff("view_", "delete_"))
    assert deleter["customizations.File"] == ["delete_with_artifacts"]
    assert deleter["customizations.Adapter"] == ["delete_with_artifacts"]
    assert deleter["customizations.FineTuningJob"] == []


def test_a_view_only_staff_user_cannot_run_a_destructive_action_by_posting_it(
    tiny_base_model: Any,
) -> None:
    """Posting the action anyway changes nothing: the key stays active, the job queued."""
    from tests.factories import FineTuningJobFactory
    from webapp.accounts.services import api_key_create

    viewer = _staff("view_")
    client = Client()
    assert client.login(username=viewer.username, password=PASSWORD)
    key, _ = api_key_create(user=UserFactory())
    job = FineTuningJobFactory(base=tiny_base_model, status="queued")
    for url, action, pk in [
        ("/admin/accounts/apikey/", "revoke", key.pk),
        ("/admin/customizations/finetuningjob/", "cancel", job.pk),
    ]:
        response = client.post(url, {"action": action, "_selected_action": [pk]})
        assert response.status_code in (200, 302)
    key.refresh_from_db()
    job.refresh_from_db()
    assert key.revoked_at is None
    assert job.status == "queued"
