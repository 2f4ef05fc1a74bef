"""/v1/models: bases and the caller's adapters; retrieve and delete."""

from __future__ import annotations

from typing import Any

import pytest

from tests.factories import CheckpointFactory, UserFactory
from webapp.core.utils import data_path
from webapp.customizations.models import Adapter

pytestmark = pytest.mark.django_db


def test_models_lists_bases_and_only_the_callers_adapters(
    api: Any, user: Any, lively_base_model: Any, make_adapter: Any
) -> None:
    """Bases are owned by 'system'; an adapter appears only for its owner."""
    mine = make_adapter(user, lively_base_model, seed=1)
    theirs = make_adapter(UserFactory(), lively_base_model, seed=2)
    body = api.get("/v1/models").json()
    owners = {m["id"]: m["owned_by"] for m in body["data"]}
    assert body["object"] == "list"
    assert owners["lively"] == "system"
    assert owners[mine.name] == user.username
    assert theirs.name not in owners


def test_models_retrieve_bases_adapters_and_checkpoints(
    api: Any, user: Any, lively_base_model: Any, make_adapter: Any
) -> None:
    """A base, an own adapter and one of its checkpoints can be retrieved by name."""
    adapter = make_adapter(user, lively_base_model, seed=1)
    CheckpointFactory(job=adapter.job, step=3)
    for name in ("lively", adapter.name, f"{adapter.name}:ckpt-step-3"):
        response = api.get(f"/v1/models/{name}")
        assert response.status_code == 200, name
        assert response.json()["id"] == name


def test_deactivated_or_foreign_adapters_are_not_found(
    api: Any, user: Any, lively_base_model: Any, make_adapter: Any
) -> None:
    """Another user's adapter and a deactivated one read as missing (404)."""
    foreign = make_adapter(UserFactory(), lively_base_model, seed=2)
    inactive = make_adapter(user, lively_base_model, seed=3)
    Adapter.objects.filter(pk=inactive.pk).update(active=False)
    for name in (foreign.name, inactive.name, "ft:nothing", f"{foreign.name}:ckpt-step-1"):
        response = api.get(f"/v1/models/{name}")
        assert response.status_code == 404, name
        assert response.json()["error"]["param"] == "model"


def test_deleting_an_own_adapter_removes_its_artifact(
    api: Any,
    user: Any,
    lively_base_model: Any,
    make_adapter: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    """DELETE answers the deletion object and the artifact folder goes with the record."""
    adapter = make_adapter(user, lively_base_model, seed=1)
    folder = data_path(adapter.path)
    with django_capture_on_commit_callbacks(execute=True):
        response = api.delete(f"/v1/models/{adapter.name}")
    assert response.json() == {"id": adapter.name, "object": "model", "deleted": True}
    assert not Adapter.objects.filter(pk=adapter.pk).exists()
    assert not folder.exists()


def test_bases_and_foreign_adapters_cannot_be_deleted(
    api: Any, lively_base_model: Any, make_adapter: Any
) -> None:
    """Deleting a base is a 403; deleting another user's adapter is a 404."""
    foreign = make_adapter(UserFactory(), lively_base_model, seed=2)
    assert api.delete("/v1/models/lively").status_code == 403
    assert api.delete(f"/v1/models/{foreign.name}").status_code == 404
    assert Adapter.objects.filter(pk=foreign.pk).exists()
