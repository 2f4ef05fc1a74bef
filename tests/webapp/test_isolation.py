"""Isolation: every object type through every endpoint, API and browser, is a 404 to others.

One table: each row is an endpoint that takes an object id (file, job, event, checkpoint,
adapter, API key), with how to call it. A stranger gets 404 and the object is unchanged;
its owner then gets anything but 404, which proves the row addresses the object at all.
Lists never show another user's records, and the admin is for staff only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from django.test import Client
from rest_framework.test import APIClient

from tests.factories import (
    PASSWORD,
    CheckpointFactory,
    FileFactory,
    FineTuningJobFactory,
    JobEventFactory,
    UserFactory,
)
from webapp.accounts.models import ApiKey
from webapp.accounts.services import api_key_create
from webapp.core.exceptions import NotFoundError
from webapp.customizations import selectors
from webapp.customizations.models import Adapter, Checkpoint, File, FineTuningJob

pytestmark = pytest.mark.django_db


@dataclass(frozen=True)
class Row:
    """One endpoint that addresses an object by id."""

    id: str
    via: str  # "api" (bearer key), "session-api" (browser session on /v1), "page"
    method: str
    url: str  # with {file} {job} {adapter} {adapter_id} {checkpoint_model} {key_id}
    data: dict[str, Any] = field(default_factory=dict)


ROWS = [
    # -- the REST API ----------------------------------------------------------------------
    Row("api-file-retrieve", "api", "get", "/v1/files/{file}"),
    Row("api-file-content", "api", "get", "/v1/files/{file}/content"),
    Row("api-file-delete", "api", "delete", "/v1/files/{file}"),
    Row("api-job-retrieve", "api", "get", "/v1/fine_tuning/jobs/{job}"),
    Row("api-job-events", "api", "get", "/v1/fine_tuning/jobs/{job}/events"),
    Row("api-job-checkpoints", "api", "get", "/v1/fine_tuning/jobs/{job}/checkpoints"),
    Row("api-job-cancel", "api", "post", "/v1/fine_tuning/jobs/{job}/cancel"),
    Row("api-model-retrieve", "api", "get", "/v1/models/{adapter}"),
    Row("api-checkpoint-retrieve", "api", "get", "/v1/models/{checkpoint_model}"),
    Row("api-model-delete", "api", "delete", "/v1/models/{adapter}"),
    Row("api-chat-adapter", "api", "post", "/v1/chat/completions", {"model": "{adapter}"}),
    Row(
        "api-chat-checkpoint",
        "api",
        "post",
        "/v1/chat/completions",
        {"model": "{checkpoint_model}"},
    ),
    Row(
        "session-chat-adapter",
        "session-api",
        "post",
        "/v1/chat/completions",
        {"model": "{adapter}"},
    ),
    Row("session-file-content", "session-api", "get", "/v1/files/{file}/content"),
    # -- the browser pages -----------------------------------------------------------------
    Row("page-file-detail", "page", "get", "/files/{file}/"),
    Row("page-job-create-from-file", "page", "post", "/files/{file}/jobs/", {"n_epochs": "1"}),
    Row("page-job-estimate", "page", "get", "/jobs/estimate/", {"training_file": "{file}"}),
    Row("page-job-detail", "page", "get", "/jobs/{job}/"),
    Row("page-job-live", "page", "get", "/jobs/{job}/live/"),
    Row("page-job-cancel", "page", "post", "/jobs/{job}/cancel/"),
    Row("page-job-retry", "page", "post", "/jobs/{job}/retry/"),
    Row("page-adapter-rename", "page", "post", "/adapters/{adapter_id}/rename/", {"label": "x"}),
    Row("page-adapter-active", "page", "post", "/adapters/{adapter_id}/active/", {"active": "0"}),
    Row("page-adapter-download", "page", "get", "/adapters/{adapter_id}/download/"),
    Row("page-adapter-delete", "page", "post", "/adapters/{adapter_id}/delete/"),
    Row("page-api-key-revoke", "page", "post", "/accounts/keys/{key_id}/revoke/"),
]


@pytest.fixture
def owned(tiny_base_model: Any, make_adapter: Callable[..., Any]) -> dict[str, Any]:
    """An owner with one of everything, each object id by placeholder name."""
    owner = UserFactory()
    job = FineTuningJobFactory(owner=owner, status="queued")
    event = JobEventFactory(job=job)
    adapter = make_adapter(owner, tiny_base_model, seed=1, suffix="mine")
    checkpoint = CheckpointFactory(
        job=adapter.job, step=4, path=adapter.path, sha256=adapter.sha256
    )
    key, _ = api_key_create(user=owner, name="owner's")
    return {
        "owner": owner,
        "file": job.training_file_id,
        "job": job.id,
        "adapter": adapter.name,
        "adapter_id": adapter.pk,
        "checkpoint_model": checkpoint.model_name,
        "key_id": key.pk,
        "event": event.id,
        "checkpoint": checkpoint.id,
    }


def _client(user: Any, via: str) -> Any:
    if via == "api":
        _, raw = api_key_create(user=user)
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
        return client
    client = APIClient() if via == "session-api" else Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def _call(client: Any, row: Row, ids: dict[str, Any]) -> Any:
    url = row.url.format(**ids)
    data = {k: str(v).format(**ids) for k, v in row.data.items()}
    if row.url.startswith("/v1/chat"):
        data = {**data, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        return client.post(url, data, format="json")
    if row.method == "get":
        return client.get(url, data)
    return getattr(client, row.method)(url, data)


def _state() -> tuple[Any, ...]:
    """Everything a mutating endpoint could change, for the before/after comparison."""
    return (
        sorted(File.objects.values_list("pk", flat=True)),
        sorted(FineTuningJob.objects.values_list("pk", "status")),
        sorted(Adapter.objects.values_list("pk", "active", "label")),
        sorted(Checkpoint.objects.values_list("pk", flat=True)),
        sorted(ApiKey.objects.values_list("pk", "revoked_at")),
    )


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_another_users_object_is_a_404_everywhere(row: Row, owned: dict[str, Any]) -> None:
    """A stranger gets 404 and changes nothing; the owner reaches the same object."""
    client = _client(UserFactory(), row.via)
    before = _state()
    response = _call(client, row, owned)
    assert response.status_code == 404, response.content[:300]
    if row.via != "page":
        assert response.json()["error"]["code"] == "not_found"
    assert _state() == before

    response = _call(_client(owned["owner"], row.via), row, owned)
    assert response.status_code != 404, response.content[:300]


def test_another_users_records_are_never_listed(owned: dict[str, Any]) -> None:
    """API lists and browser pages list only the caller's own records."""
    stranger = UserFactory()
    FileFactory(owner=stranger)
    api = _client(stranger, "api")
    files = api.get("/v1/files").json()["data"]
    assert owned["file"] not in [f["id"] for f in files]
    assert len(files) == 1
    assert api.get("/v1/fine_tuning/jobs").json()["data"] == []
    assert owned["adapter"] not in [m["id"] for m in api.get("/v1/models").json()["data"]]
    page = _client(stranger, "page")
    for url in ("/", "/files/", "/jobs/", "/adapters/", "/playground/", "/accounts/keys/"):
        html = page.get(url).content.decode()
        for key in ("file", "job", "adapter"):
            assert str(owned[key]) not in html, (url, key)


@pytest.mark.parametrize(
    "select",
    [
        lambda user, ids: selectors.file_get(user=user, file_id=ids["file"]),
        lambda user, ids: selectors.job_get(user=user, job_id=ids["job"]),
        lambda user, ids: selectors.job_event_list(user=user, job_id=ids["job"]),
        lambda user, ids: selectors.job_event_get(user=user, event_id=ids["event"]),
        lambda user, ids: selectors.checkpoint_list(user=user, job_id=ids["job"]),
        lambda user, ids: selectors.checkpoint_get(user=user, checkpoint_id=ids["checkpoint"]),
        lambda user, ids: selectors.adapter_get(user=user, name=ids["adapter"]),
        lambda user, ids: selectors.model_resolve(user=user, name=ids["checkpoint_model"]),
    ],
    ids=["file", "job", "events", "event", "checkpoints", "checkpoint", "adapter", "ckpt-model"],
)
def test_selectors_filter_by_owner(select: Any, owned: dict[str, Any]) -> None:
    """Below the endpoints, every read is filtered by its user: NotFoundError for others."""
    assert select(owned["owner"], owned) is not None
    with pytest.raises(NotFoundError):
        select(UserFactory(), owned)


def test_the_admin_is_for_staff_only(owned: dict[str, Any]) -> None:
    """A signed-in user who is not staff is sent to the admin's log-in, for every record."""
    client = _client(owned["owner"], "page")
    for model in ("file", "finetuningjob", "adapter", "checkpoint", "jobevent", "basemodel"):
        response = client.get(f"/admin/customizations/{model}/")
        assert response.status_code == 302, model
        assert response["Location"].startswith("/admin/login/")
    staff = UserFactory(is_staff=True, is_superuser=True)
    assert _client(staff, "page").get("/admin/customizations/file/").status_code == 200
