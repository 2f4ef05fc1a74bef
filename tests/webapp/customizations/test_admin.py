"""The admin: every record is browsable, and the operator actions go through services."""

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
    UserFactory,
)
from webapp.core.utils import data_path
from webapp.customizations.models import Adapter, Checkpoint, File, FineTuningJob
from webapp.customizations.services.jobs import job_event_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(tiny_base_model: Any) -> Client:
    user = UserFactory(is_staff=True, is_superuser=True)
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def _act(client: Client, model: str, action: str, *pks: Any) -> Any:
    return client.post(
        f"/admin/customizations/{model}/",
        {"action": action, "_selected_action": [str(pk) for pk in pks]},
        follow=True,
    )


@pytest.mark.parametrize(
    "model",
    ["basemodel", "file", "featureset", "finetuningjob", "jobevent", "checkpoint", "adapter"],
)
def test_every_record_has_a_searchable_filterable_changelist(
    admin_client: Client, model: str
) -> None:
    """Each changelist renders, with a search box and filters."""
    AdapterFactory()
    response = admin_client.get(f"/admin/customizations/{model}/?q=a")
    assert response.status_code == 200
    assert 'id="searchbar"' in response.content.decode()
    assert admin_client.get("/admin/accounts/apikey/").status_code == 200
    assert admin_client.get("/admin/accounts/user/").status_code == 200


def test_job_page_shows_events_checkpoints_and_a_loss_curve(admin_client: Client) -> None:
    """The read-only job page has the loss curve (inline SVG), events and checkpoints."""
    job = FineTuningJobFactory(status="running", stage="training")
    for step, loss in ((1, 2.5), (2, 2.0), (3, 1.0)):
        job_event_create(
            job=job, message=f"step {step}", type="metrics", data={"step": step, "train_loss": loss}
        )
    job_event_create(job=job, message="Training started on 14 examples")
    job_event_create(
        job=job, message="Epoch 1/1: training loss=1.8", type="metrics",
        data={"step": 3, "epoch": 1, "epoch_train_loss": 1.8},
    )  # fmt: skip
    CheckpointFactory(job=job, step=2)
    html = admin_client.get(f"/admin/customizations/finetuningjob/{job.pk}/change/").content
    page = html.decode()
    assert "<svg" in page
    assert "polyline" in page
    assert "Training started on 14 examples" in page
    assert "Epoch 1/1: training loss=1.8" in page
    assert "step 2<" not in page  # per-step metrics are drawn, not listed
    assert "jobs/" in page  # the checkpoint's artifact path


def test_admin_activates_and_deactivates_adapters(admin_client: Client) -> None:
    """The activate/deactivate actions flip the served flag."""
    adapters = [AdapterFactory(), AdapterFactory()]
    _act(admin_client, "adapter", "deactivate", *[a.pk for a in adapters])
    assert not Adapter.objects.filter(active=True).exists()
    _act(admin_client, "adapter", "activate", adapters[0].pk)
    assert list(Adapter.objects.filter(active=True)) == [adapters[0]]


def test_admin_cancels_and_retries_jobs(
    admin_client: Client, django_capture_on_commit_callbacks: Any
) -> None:
    """Cancel stops unfinished jobs; retry re-queues failed ones; others are refused."""
    running = FineTuningJobFactory(status="running")
    failed = FineTuningJobFactory(status="failed", error={"code": "x", "message": "y"})
    done = FineTuningJobFactory(status="succeeded")
    response = _act(admin_client, "finetuningjob", "cancel", running.pk, done.pk)
    assert "cannot be cancelled" in response.content.decode()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        _act(admin_client, "finetuningjob", "retry", failed.pk)
    statuses = dict(FineTuningJob.objects.values_list("pk", "status"))
    assert statuses == {
        running.pk: "cancelled",
        failed.pk: "validating_files",
        done.pk: "succeeded",
    }
    assert len(callbacks) == 1


def test_admin_delete_removes_adapter_artifacts(
    admin_client: Client, django_capture_on_commit_callbacks: Any
) -> None:
    """Deleting adapters removes their artifact folders and their job's checkpoints."""
    adapter = AdapterFactory()
    checkpoint = CheckpointFactory(job=adapter.job)
    data_path(checkpoint.path).mkdir(parents=True)
    assert data_path(adapter.path).is_dir()
    with django_capture_on_commit_callbacks(execute=True):
        _act(admin_client, "adapter", "delete_with_artifacts", adapter.pk)
    assert not Adapter.objects.exists()
    assert not Checkpoint.objects.exists()
    assert not data_path(adapter.path).exists()
    assert not data_path(checkpoint.path).exists()


def test_admin_delete_removes_file_content(
    admin_client: Client, django_capture_on_commit_callbacks: Any
) -> None:
    """Deleting a file from its admin page removes the stored upload too."""
    file = FileFactory()
    assert data_path(file.path).is_file()
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            f"/admin/customizations/file/{file.pk}/delete/", {"post": "yes"}, follow=True
        )
    assert response.status_code == 200
    assert not File.objects.exists()
    assert not data_path(file.path).exists()


def test_bulk_delete_without_artifact_cleanup_is_not_offered(admin_client: Client) -> None:
    """Django's plain bulk delete (which would skip the services) is removed."""
    FileFactory()
    page = admin_client.get("/admin/customizations/file/").content.decode()
    assert "delete_selected" not in page
    assert "delete_with_artifacts" in page
