"""What the stages record (services/results.py), run through the eager tasks on a tiny base:
events, checkpoints, the adapter, cancellation mid-stage and failures to record."""

from __future__ import annotations

from typing import Any

import pytest

from tests.factories import FileFactory, UserFactory
from tests.helpers.eager_jobs import job_messages, run_job
from webapp.core.utils import data_path
from webapp.customizations.models import Adapter, FeatureSet, FineTuningJob
from webapp.customizations.services import results
from webapp.customizations.services.jobs import job_cancel
from workers import tasks

pytestmark = pytest.mark.django_db


def test_pipeline_trains_an_adapter_and_records_events_and_checkpoints(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """Validation, extraction and training run in turn and register a servable adapter."""
    user = UserFactory()
    file = FileFactory(owner=user)
    job = run_job(django_capture_on_commit_callbacks, user=user, file=file, suffix="toy")
    assert job.status == "succeeded", job.error
    assert job.progress == 1.0
    assert job.trained_tokens > 0
    adapter = Adapter.objects.get(job=job)
    assert adapter.name == f"ft:tiny:{user.username}:toy:{job.id}"
    assert adapter.active
    assert (data_path(adapter.path) / "carry_on.safetensors").is_file()
    assert adapter.n_parameters > 0
    # 14 training examples (2 held out), batches of 4, 2 epochs: 8 steps, a checkpoint
    # every 2 steps (the epoch ends included), of which the newest 3 are kept.
    assert list(job.checkpoints.order_by("step").values_list("step", flat=True)) == [4, 6, 8]
    assert all(data_path(c.path).is_dir() for c in job.checkpoints.all())
    assert sorted(p.name for p in data_path(f"jobs/{job.id}/checkpoints").iterdir()) == [
        f"step-{step:08d}" for step in (4, 6, 8)
    ]
    metrics = job.events.filter(type="metrics")
    assert sorted(e.data["step"] for e in metrics if "train_loss" in e.data) == list(range(1, 9))
    assert metrics.filter(data__has_key="valid_loss").count() == 2
    messages = job_messages(job)
    assert messages[0].startswith("Validating training file")
    assert any(m.startswith("Extracting hidden states") for m in messages)
    assert messages[-1] == "The job has successfully completed"
    assert job.hyperparameters == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0}
    assert isinstance(job.carry_on["max_length"], int)


def test_cancel_during_extraction_stops_it(
    tiny_base_model: Any,
    django_capture_on_commit_callbacks: Any,
    quick_heartbeat: None,
    monkeypatch: Any,
) -> None:
    """Extraction checks for cancellation between batches and stops without a result."""
    user = UserFactory()
    original = results.job_record_progress

    def cancel_on_first_beat(**kwargs: Any) -> bool:
        job_cancel(job=FineTuningJob.objects.get(pk=kwargs["job"].pk), user=user)
        return original(**kwargs)

    monkeypatch.setattr("workers.runtime.job_record_progress", cancel_on_first_beat)
    job = run_job(django_capture_on_commit_callbacks, user=user, file=FileFactory(owner=user))
    assert job.status == "cancelled"
    assert not FeatureSet.objects.filter(status="ready").exists()
    assert not Adapter.objects.exists()


def test_cancel_during_training_stops_cooperatively(
    tiny_base_model: Any,
    django_capture_on_commit_callbacks: Any,
    quick_heartbeat: None,
    monkeypatch: Any,
) -> None:
    """A cancel arriving mid-training stops it at the next step; no adapter is registered."""
    user = UserFactory()
    original = tasks.job_record_metrics
    seen: list[int] = []

    def cancel_at_step_three(*, job: FineTuningJob, data: dict[str, Any], message: str) -> None:
        original(job=job, data=data, message=message)
        seen.append(data["step"])
        if data["step"] == 3 and "train_loss" in data:
            job_cancel(job=FineTuningJob.objects.get(pk=job.pk), user=user)

    monkeypatch.setattr(tasks, "job_record_metrics", cancel_at_step_three)
    job = run_job(django_capture_on_commit_callbacks, user=user, file=FileFactory(owner=user))
    assert job.status == "cancelled"
    assert max(seen) <= 4
    assert not Adapter.objects.exists()
    assert not list(data_path("adapters").glob(f"{job.id}*"))
    assert any(m.startswith("Job was cancelled") for m in job_messages(job))


@pytest.mark.parametrize("area", ["features", "adapters"])
def test_unwritable_artifact_storage_fails_the_job_with_a_clear_error(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any, data_dir: Any, area: str
) -> None:
    """Storage that refuses writes fails the job with storage_error; nothing is registered."""
    data_path(area).parent.mkdir(parents=True, exist_ok=True)
    data_path(area).write_bytes(b"")  # a file where a folder must be: every write fails
    user = UserFactory()
    job = run_job(django_capture_on_commit_callbacks, user=user, file=FileFactory(owner=user))
    assert job.status == "failed"
    assert job.error["code"] == "storage_error"
    assert f"({area})" in job.error["message"]
    assert str(data_dir) not in job.error["message"]  # server paths stay private
    assert not Adapter.objects.exists()
    if area == "features":
        assert not FeatureSet.objects.filter(status="ready").exists()


def test_a_parent_deleted_while_its_child_trains_is_not_recorded(tiny_base_model: Any) -> None:
    """The child still succeeds; its adapter has no parent (the job keeps the name), rather
    than failing on a parent read when the job was claimed."""
    from tests.factories import AdapterFactory, FineTuningJobFactory

    user = UserFactory()
    parent = AdapterFactory(job=FineTuningJobFactory(owner=user, status="succeeded"))
    job = FineTuningJobFactory(
        owner=user, status="running", worker="w", parent=parent, parent_model=parent.name
    )
    Adapter.objects.filter(pk=parent.pk).delete()  # `job` still holds parent_id
    adapter = results.job_succeed(
        job=job,
        worker="w",
        path=data_path("adapters/child"),
        sha256="0" * 64,
        nbytes=1,
        n_parameters=1,
        metrics={},
        trained_tokens=1,
    )
    assert adapter is not None
    assert adapter.parent is None
    job.refresh_from_db()
    assert (job.status, job.parent, job.parent_model) == ("succeeded", None, parent.name)
