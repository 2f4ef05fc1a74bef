"""The server-rendered upload page, driven through Django's test client (no JavaScript)."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from tests.factories import (
    PASSWORD,
    AdapterFactory,
    FileFactory,
    FineTuningJobFactory,
    UserFactory,
)
from tests.helpers.carry_on_kit import toy_jsonl
from webapp.core.utils import data_path
from webapp.customizations.artifacts import write_bytes_atomic
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
    response = client.post(
        "/", {"file": SimpleUploadedFile("ok.jsonl", toy_jsonl(12))}, follow=True
    )
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
    client.post("/", {"file": SimpleUploadedFile("ok.jsonl", toy_jsonl(12))})
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


# -- the browser pages beyond the upload form ---------------------------------------------------


def _metrics(job: FineTuningJob, steps: list[tuple[int, float]], total: int) -> None:
    for step, loss in steps:
        job_event_create(
            job=job, message=f"Step {step}/{total}", type="metrics",
            data={"step": step, "total_steps": total, "train_loss": loss},
        )  # fmt: skip


def _adapter_with_artifact(owner: Any, **kwargs: Any) -> Adapter:
    adapter = AdapterFactory(job__owner=owner, **kwargs)
    folder = data_path(adapter.path)
    write_bytes_atomic(folder / "carry_on_config.json", b'{"format_version": 1}')
    return adapter


def test_every_page_renders_its_empty_state_for_a_new_user(tiny_base_model: Any) -> None:
    """A user with nothing yet sees each page with a clear empty state, not an error."""
    client = _client(UserFactory())
    expected = {
        "/": "No datasets yet",
        "/files/": "No datasets yet",
        "/jobs/": "No jobs yet",
        "/jobs/new/": "no validated dataset yet",
        "/adapters/": "No adapters yet",
        "/playground/": "You have no active adapter yet",
        "/accounts/keys/": "No keys yet",
    }
    for path, text in expected.items():
        response = client.get(path)
        assert response.status_code == 200, path
        assert text in response.content.decode(), path


def test_pages_load_their_own_static_assets_and_no_cdn(tiny_base_model: Any) -> None:
    """The stylesheet and script come from /static/; no page points at another host."""
    html = _client(UserFactory()).get("/").content.decode()
    assert '/static/studio/studio.css"' in html
    assert '/static/studio/studio.js"' in html
    assert "https://" not in html
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_upload_with_json_accept_answers_json_for_the_progress_bar(tiny_base_model: Any) -> None:
    """The page's script gets {"redirect"} for a stored file and {"errors"} for a refusal."""
    client = _client(UserFactory())
    ok = client.post(
        "/files/", {"file": SimpleUploadedFile("ok.jsonl", toy_jsonl(4))},
        headers={"accept": "application/json"},
    )  # fmt: skip
    file = File.objects.get()
    assert ok.status_code == 200
    assert ok.json() == {"redirect": f"/files/{file.id}/", "status": "processed"}
    missing = client.post("/files/", {}, headers={"accept": "application/json"})
    assert missing.status_code == 400
    assert missing.json()["errors"]


def test_dataset_page_previews_examples_as_the_chat_template_renders_them(
    tiny_base_model: Any,
) -> None:
    """The report lists counts; the preview shows the first examples with template tokens."""
    user = UserFactory()
    file = FileFactory(owner=user, content=toy_jsonl(12))
    html = _client(user).get(f"/files/{file.id}/").content.decode()
    assert "Valid examples" in html
    assert "Line 1" in html
    assert "&lt;|im_start|&gt;assistant" in html
    assert f"/jobs/new/?training_file={file.id}" in html


def test_new_job_page_starts_a_job_with_carry_on_size_and_taps(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """Epochs, learning rate, width, blocks and taps from the form reach the job."""
    user = UserFactory()
    file = FileFactory(owner=user)
    client = _client(user)
    page = client.get(f"/jobs/new/?training_file={file.id}").content.decode()
    assert f'value="{file.id}" selected' in page
    assert "Estimated time" in page
    with django_capture_on_commit_callbacks(execute=False):
        response = client.post(
            "/jobs/new/",
            {
                "training_file": file.id, "model": "tiny", "n_epochs": "2",
                "learning_rate_multiplier": "0.5", "d_model": "64", "n_blocks": "1",
                "taps": "-1, 1", "tap_mode": "ladder", "suffix": "mine",
            },
        )  # fmt: skip
    job = FineTuningJob.objects.get()
    assert response["Location"] == f"/jobs/{job.id}/"
    assert job.hyperparameters["n_epochs"] == 2
    assert job.hyperparameters["learning_rate_multiplier"] == 0.5
    assert (job.carry_on["d_model"], job.carry_on["n_blocks"]) == (64, 1)
    assert (job.carry_on["taps"], job.carry_on["tap_mode"]) == ([-1, 1], "ladder")


def test_new_job_form_names_a_tap_beyond_the_base(tiny_base_model: Any) -> None:
    """A layer the base does not have is refused in the form, with its range."""
    user = UserFactory()
    file = FileFactory(owner=user)
    response = _client(user).post(
        "/jobs/new/", {"training_file": file.id, "model": "tiny", "taps": "99"}
    )
    assert response.status_code == 400
    assert "99 is out of range" in response.content.decode()
    assert not FineTuningJob.objects.exists()


def test_time_estimate_grows_with_epochs(tiny_base_model: Any) -> None:
    """The estimate endpoint answers seconds and a label; more epochs take longer."""
    user = UserFactory()
    file = FileFactory(owner=user)
    client = _client(user)
    one = client.get("/jobs/estimate/", {"training_file": file.id, "n_epochs": 1}).json()
    ten = client.get("/jobs/estimate/", {"training_file": file.id, "n_epochs": 10}).json()
    assert one["text"].startswith("about ")
    assert ten["seconds"] > one["seconds"]
    other = FileFactory()
    assert client.get("/jobs/estimate/", {"training_file": other.id}).status_code == 404


def test_job_live_endpoint_returns_state_curve_and_log(tiny_base_model: Any) -> None:
    """What the job page polls: progress, ETA, and the same SVG the page renders."""
    job = FineTuningJobFactory(status="running", stage="training", progress=0.5)
    job.started_at = job.created_at - timedelta(seconds=60)
    job.save()
    _metrics(job, [(1, 2.0), (2, 1.5), (3, 1.1)], total=12)
    job_event_create(job=job, message="Training started on 14 examples")
    client = _client(job.owner)
    live = client.get(f"/jobs/{job.id}/live/").json()
    assert (live["status"], live["stage"], live["progress"]) == ("running", "training", 0.5)
    assert live["eta"].endswith("left")
    assert live["cancellable"] is True
    assert live["retryable"] is False
    assert live["curve_points"] == 3
    assert 'data-total-steps="12"' in live["curve_html"]
    assert "Training started on 14 examples" in live["events_html"]
    assert "Step 2/12" not in live["events_html"]  # per-step metrics are drawn, not listed
    page = client.get(f"/jobs/{job.id}/").content.decode()
    assert live["curve_html"].strip() in page  # one rendering, the first paint and updates


def test_retry_button_requeues_a_failed_job(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """A failed job shows Retry; posting it sends the job back to validation."""
    job = FineTuningJobFactory(status="failed", error={"code": "x", "message": "boom"})
    client = _client(job.owner)
    page = client.get(f"/jobs/{job.id}/").content.decode()
    assert "boom" in page
    assert 'data-when="retryable" hidden' not in page  # the Retry button shows
    assert 'data-when="cancellable" hidden' in page
    with django_capture_on_commit_callbacks(execute=False):
        response = client.post(f"/jobs/{job.id}/retry/", follow=True)
    job.refresh_from_db()
    assert job.status == "validating_files"
    assert "The job was retried" in response.content.decode()


def test_adapters_can_be_renamed_deactivated_and_deleted(tiny_base_model: Any) -> None:
    """Rename keeps the API name; deactivate stops serving; delete removes the artifact."""
    user = UserFactory()
    adapter = _adapter_with_artifact(user)
    client = _client(user)
    client.post(f"/adapters/{adapter.pk}/rename/", {"label": "  Tutor\x07 "})
    adapter.refresh_from_db()
    name = adapter.name
    assert (adapter.label, adapter.name) == ("Tutor", name)
    assert "Tutor" in client.get("/adapters/").content.decode()
    client.post(f"/adapters/{adapter.pk}/active/", {"active": "0"})
    adapter.refresh_from_db()
    assert adapter.active is False
    folder = data_path(adapter.path)
    with _on_commit_executed():
        client.post(f"/adapters/{adapter.pk}/delete/")
    assert not Adapter.objects.exists()
    assert not folder.exists()


def test_adapter_download_is_a_zip_of_the_artifact_with_a_safe_name(
    tiny_base_model: Any,
) -> None:
    """The bundle holds the weights and the config; its name never carries a path."""
    user = UserFactory()
    adapter = _adapter_with_artifact(user, label="../../etc/passwd tutor")
    response = _client(user).get(f"/adapters/{adapter.pk}/download/")
    assert response.status_code == 200
    assert response["content-type"] == "application/zip"
    assert 'filename="etc-passwd-tutor.zip"' in response["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content))) as bundle:
        assert sorted(bundle.namelist()) == ["carry_on.safetensors", "carry_on_config.json"]


def test_another_users_records_are_404_on_every_page(tiny_base_model: Any) -> None:
    """Files, jobs, live state, adapters and their actions answer 404 to anyone else."""
    owner = UserFactory()
    adapter = _adapter_with_artifact(owner)
    job = adapter.job
    file = job.training_file
    stranger = _client(UserFactory())
    gets = [f"/files/{file.id}/", f"/jobs/{job.id}/", f"/jobs/{job.id}/live/",
            f"/adapters/{adapter.pk}/download/"]  # fmt: skip
    posts = [f"/jobs/{job.id}/cancel/", f"/jobs/{job.id}/retry/", f"/files/{file.id}/jobs/",
             f"/adapters/{adapter.pk}/rename/", f"/adapters/{adapter.pk}/active/",
             f"/adapters/{adapter.pk}/delete/"]  # fmt: skip
    for path in gets:
        assert stranger.get(path).status_code == 404, path
    for path in posts:
        assert stranger.post(path, {"label": "mine", "active": "0"}).status_code == 404, path
    adapter.refresh_from_db()
    assert (adapter.label, adapter.active) == ("", True)


def test_dashboard_shows_running_jobs_datasets_and_adapters(tiny_base_model: Any) -> None:
    """At a glance: counts, the running job with its progress, the adapter by name."""
    user = UserFactory()
    adapter = _adapter_with_artifact(user, label="Arithmetic tutor")
    running = FineTuningJobFactory(owner=user, status="running", stage="training", progress=0.4)
    html = _client(user).get("/").content.decode()
    assert running.id in html
    assert 'value="40"' in html
    assert adapter.label in html
    assert "2</span> datasets" in html


@pytest.fixture
def _engine() -> Any:
    from webapp.serving.engine import reset_engine

    reset_engine()
    yield
    reset_engine()


@pytest.mark.usefixtures("_engine")
def test_playground_without_javascript_answers_one_prompt_side_by_side(
    tiny_base_model: Any, settings: Any
) -> None:
    """The plain form posts one prompt and shows the base's and the adapter's answers."""
    user = UserFactory()
    client = _client(user)
    page = client.get("/playground/").content.decode()
    assert 'data-chat-url="/v1/chat/completions"' in page
    response = client.post(
        "/playground/",
        {"model": "tiny", "compare": "on", "compare_model": "tiny", "prompt": "Hi",
         "temperature": "0", "top_p": "1", "max_tokens": "4"},
    )  # fmt: skip
    html = response.content.decode()
    assert response.status_code == 200
    assert html.count("data-answer") == 2
    refused = client.post(
        "/playground/",
        {"model": "ft:nope", "prompt": "Hi", "temperature": "0", "top_p": "1", "max_tokens": "4"},
    )
    assert refused.status_code == 404
    assert "does not exist" in refused.content.decode()


@contextmanager
def _on_commit_executed() -> Iterator[None]:
    from django.test import TestCase

    with TestCase.captureOnCommitCallbacks(execute=True):
        yield
