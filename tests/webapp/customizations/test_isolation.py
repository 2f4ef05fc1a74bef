"""Isolation: for every record a user owns, another user's id is a 404 and never listed."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from tests.factories import (
    PASSWORD,
    AdapterFactory,
    CheckpointFactory,
    FileFactory,
    FineTuningJobFactory,
    JobEventFactory,
    UserFactory,
)
from webapp.core.exceptions import NotFoundError
from webapp.customizations import selectors

pytestmark = pytest.mark.django_db


def _file(owner: Any) -> tuple[Any, Any, Any]:
    record = FileFactory(owner=owner)
    return (
        record.id,
        lambda user, key: selectors.file_get(user=user, file_id=key),
        lambda user: selectors.file_list(user=user),
    )


def _job(owner: Any) -> tuple[Any, Any, Any]:
    record = FineTuningJobFactory(owner=owner)
    return (
        record.id,
        lambda user, key: selectors.job_get(user=user, job_id=key),
        lambda user: selectors.job_list(user=user),
    )


def _event(owner: Any) -> tuple[Any, Any, Any]:
    record = JobEventFactory(job=FineTuningJobFactory(owner=owner))
    return (
        record.id,
        lambda user, key: selectors.job_event_get(user=user, event_id=key),
        lambda user: [e for j in selectors.job_list(user=user) for e in j.events.all()],
    )


def _checkpoint(owner: Any) -> tuple[Any, Any, Any]:
    record = CheckpointFactory(job=FineTuningJobFactory(owner=owner))
    return (
        record.id,
        lambda user, key: selectors.checkpoint_get(user=user, checkpoint_id=key),
        lambda user: [c for j in selectors.job_list(user=user) for c in j.checkpoints.all()],
    )


def _adapter(owner: Any) -> tuple[Any, Any, Any]:
    record = AdapterFactory(job=FineTuningJobFactory(owner=owner, status="succeeded"))
    return (
        record.name,
        lambda user, key: selectors.adapter_get(user=user, name=key),
        lambda user: selectors.adapter_list(user=user),
    )


@pytest.mark.parametrize("make", [_file, _job, _event, _checkpoint, _adapter])
def test_another_users_record_is_not_found_and_never_listed(
    tiny_base_model: Any, make: Any
) -> None:
    """The owner gets the record; anyone else gets NotFoundError and an empty list."""
    owner, stranger = UserFactory(), UserFactory()
    key, get, listing = make(owner)
    assert get(owner, key) is not None
    with pytest.raises(NotFoundError) as caught:
        get(stranger, key)
    assert caught.value.status == 404
    assert list(listing(stranger)) == []
    assert len(list(listing(owner))) == 1


def test_job_events_of_another_users_job_are_not_found(tiny_base_model: Any) -> None:
    """Listing events or checkpoints through another user's job id is a 404 too."""
    job = FineTuningJobFactory()
    stranger = UserFactory()
    with pytest.raises(NotFoundError):
        selectors.job_event_list(user=stranger, job_id=job.id)
    with pytest.raises(NotFoundError):
        selectors.checkpoint_list(user=stranger, job_id=job.id)


@pytest.mark.parametrize("page", ["file_detail", "job_detail", "job_cancel", "job_create"])
def test_another_users_pages_are_404(tiny_base_model: Any, page: str) -> None:
    """The browser pages of another user's file or job answer 404."""
    job = FineTuningJobFactory(status="running")
    stranger = UserFactory()
    client = Client()
    assert client.login(username=stranger.username, password=PASSWORD)
    key = job.training_file_id if page.startswith("file") or page == "job_create" else job.id
    url = {
        "file_detail": f"/files/{key}/",
        "job_create": f"/files/{key}/jobs/",
        "job_detail": f"/jobs/{key}/",
        "job_cancel": f"/jobs/{key}/cancel/",
    }[page]
    response = client.post(url) if page in ("job_cancel", "job_create") else client.get(url)
    assert response.status_code == 404
    job.refresh_from_db()
    assert job.status == "running"
