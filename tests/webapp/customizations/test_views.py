"""The server-rendered upload page, driven through Django's test client (no JavaScript)."""

from __future__ import annotations

from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from tests.factories import PASSWORD, FineTuningJobFactory, UserFactory
from tests.helpers.carry_on_kit import toy_jsonl
from webapp.customizations.models import (
    Adapter,
    Checkpoint,
    FeatureSet,
    File,
    FineTuningJob,
    JobEvent,
)
from webapp.customizations.services.jobs import job_event_create

pytestmark = pytest.mark.django_db

MALFORMED = b'{"question": "What is 2+2?", "answer": "4"}\n{"question": "What is 3+3?"}\n{broken\n'


def _client(user: Any) -> Client:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client


def test_upload_page_requires_login() -> None:
    """Anonymous visitors are sent to the login page."""
    response = Client().get("/")
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_upload_page_renders_a_plain_form(tiny_base_model: Any) -> None:
    """The page holds a multipart form with a file input: it works without JavaScript."""
    response = _client(UserFactory()).get("/")
    html = response.content.decode()
    assert response.status_code == 200
    assert 'enctype="multipart/form-data"' in html
    assert 'type="file"' in html
    assert 'id="dropzone"' in html


def test_malformed_upload_shows_a_report_naming_its_lines_and_creates_nothing_else(
    tiny_base_model: Any,
) -> None:
    """Only the File record is created; its page lists each problem with its line number."""
    user = UserFactory()
    client = _client(user)
    upload = SimpleUploadedFile("bad.jsonl", MALFORMED)
    response = client.post("/", {"file": upload}, follow=True)
    assert response.status_code == 200
    file = File.objects.get()
    assert file.status == "error"
    assert response.redirect_chain[-1][0] == f"/files/{file.id}/"
    html = response.content.decode()
    assert "line 2" in html
    assert "line 3" in html
    assert "missing" in html
    assert "Start job" not in html
    for model in (FineTuningJob, FeatureSet, JobEvent, Checkpoint, Adapter):
        assert not model.objects.exists()


def test_valid_upload_then_start_a_job_from_the_page(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """A valid file shows its counts and a job form; posting it creates a queued job."""
    user = UserFactory()
    client = _client(user)
    response = client.post("/", {"file": SimpleUploadedFile("ok.jsonl", toy_jsonl(6))}, follow=True)
    file = File.objects.get()
    html = response.content.decode()
    assert file.status == "processed"
    assert "No problems found" in html
    assert "Start job" in html
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = client.post(
            f"/files/{file.id}/jobs/", {"model": "tiny", "n_epochs": "2", "suffix": "web"}
        )
    job = FineTuningJob.objects.get()
    assert response.status_code == 302
    assert response["Location"] == f"/jobs/{job.id}/"
    assert job.owner == user
    assert job.hyperparameters["n_epochs"] == 2
    assert job.hyperparameters["batch_size"] == "auto"
    assert len(callbacks) == 1  # validation is enqueued once the request commits
    page = client.get(f"/jobs/{job.id}/").content.decode()
    assert "validating_files" in page
    assert 'http-equiv="refresh"' in page


def test_job_form_errors_are_shown(tiny_base_model: Any) -> None:
    """A refused job request re-renders the page with the reason and status 400."""
    user = UserFactory()
    client = _client(user)
    client.post("/", {"file": SimpleUploadedFile("ok.jsonl", toy_jsonl(3))})
    file = File.objects.get()
    response = client.post(f"/files/{file.id}/jobs/", {"model": "tiny", "n_epochs": "999"})
    assert response.status_code == 400
    assert not FineTuningJob.objects.exists()


def test_job_page_shows_events_and_a_loss_curve(tiny_base_model: Any) -> None:
    """Metrics events become an inline SVG loss curve; messages are listed."""
    job = FineTuningJobFactory(status="running", stage="training")
    for step, loss in enumerate([2.0, 1.5, 1.2], start=1):
        job_event_create(
            job=job, message=f"step {step}", type="metrics", data={"step": step, "train_loss": loss}
        )
    job_event_create(job=job, message="Training started on 14 examples")
    page = _client(job.owner).get(f"/jobs/{job.id}/").content.decode()
    assert "<svg" in page
    assert "polyline" in page
    assert "Training started on 14 examples" in page


def test_cancel_button_cancels_the_job(tiny_base_model: Any) -> None:
    """Posting the cancel form cancels a running job."""
    job = FineTuningJobFactory(status="running")
    response = _client(job.owner).post(f"/jobs/{job.id}/cancel/", follow=True)
    job.refresh_from_db()
    assert job.status == "cancelled"
    assert "The job was cancelled." in response.content.decode()
