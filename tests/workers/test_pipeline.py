"""The Celery pipeline run in-process (eager tasks) on a tiny base: every stage, its
idempotency, cancellation, failures and recovery of a job whose worker died."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db import OperationalError
from django.utils import timezone

from tests.factories import FileFactory, UserFactory
from tests.helpers.carry_on_kit import toy_jsonl
from webapp.core.utils import data_path
from webapp.customizations.models import Adapter, Checkpoint, FeatureSet, FineTuningJob
from webapp.customizations.services import pipeline
from webapp.customizations.services.jobs import job_cancel, job_create
from workers import tasks

pytestmark = pytest.mark.django_db
TINY = {"d_model": 16, "n_heads": 2, "checkpoint_every": 2}
HYPER = {"n_epochs": 2, "batch_size": 4}


def _create(user: Any, file: Any, **overrides: Any) -> FineTuningJob:
    options = {"hyperparameters": HYPER, "carry_on": TINY, "seed": 3, **overrides}
    return job_create(user=user, training_file=file.id, **options)


def _run(capture: Any, **kwargs: Any) -> FineTuningJob:
    """Create a job and let the eager tasks it enqueues on commit run to the end."""
    with capture(execute=True):
        job = _create(**kwargs)
    job.refresh_from_db()
    return job


def _messages(job: FineTuningJob) -> list[str]:
    return list(job.events.order_by("seq").values_list("message", flat=True))


def test_pipeline_trains_an_adapter_and_records_events_and_checkpoints(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """Validation, extraction and training run in turn and register a servable adapter."""
    user = UserFactory()
    file = FileFactory(owner=user)
    job = _run(django_capture_on_commit_callbacks, user=user, file=file, suffix="toy")
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
    messages = _messages(job)
    assert messages[0].startswith("Validating training file")
    assert any(m.startswith("Extracting hidden states") for m in messages)
    assert messages[-1] == "The job has successfully completed"
    assert job.hyperparameters == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0}
    assert isinstance(job.carry_on["max_length"], int)


def test_second_job_on_same_file_and_base_skips_extraction(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any, monkeypatch: Any
) -> None:
    """The cached feature sets are reused: the second job never runs the base or the embed task."""
    user = UserFactory()
    file = FileFactory(owner=user)
    first = _run(django_capture_on_commit_callbacks, user=user, file=file)
    assert first.status == "succeeded"
    assert FeatureSet.objects.filter(status="ready").count() == 2  # train and held-out split

    def no_extraction(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("extraction ran for a cached dataset")

    monkeypatch.setattr(tasks, "_extract", no_extraction)
    second = _run(django_capture_on_commit_callbacks, user=user, file=file, seed=4)
    assert second.status == "succeeded", second.error
    assert second.train_features_id == first.train_features_id
    assert second.valid_features_id == first.valid_features_id
    assert FeatureSet.objects.count() == 2
    assert second.events.filter(data__extraction_skipped=True).exists()


def test_task_reruns_are_idempotent(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """Running any stage's task again after the job finished changes nothing."""
    user = UserFactory()
    job = _run(django_capture_on_commit_callbacks, user=user, file=FileFactory(owner=user))
    assert job.status == "succeeded"
    events, checkpoints = job.events.count(), job.checkpoints.count()
    with django_capture_on_commit_callbacks(execute=True):
        results = [
            tasks.validate_job_files.apply(args=[job.id]).get(),
            tasks.extract_job_features.apply(args=[job.id]).get(),
            tasks.train_job.apply(args=[job.id]).get(),
        ]
    assert results == ["skipped", "skipped", "skipped"]
    job.refresh_from_db()
    assert job.status == "succeeded"
    assert job.events.count() == events
    assert job.checkpoints.count() == checkpoints
    assert Adapter.objects.filter(job=job).count() == 1


@pytest.mark.parametrize(
    "stage", ["validating_files", "queued_for_extraction", "queued_for_training"]
)
def test_cancel_before_a_stage_makes_its_task_a_no_op(
    stage: str, tiny_base_model: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """A job cancelled while waiting for a worker is left alone by the task that arrives."""
    user = UserFactory()
    file = FileFactory(owner=user)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        job = _create(user=user, file=file)
    task = tasks.validate_job_files
    if stage != "validating_files":
        with django_capture_on_commit_callbacks(execute=False):
            tasks.validate_job_files.apply(args=[job.id])
        job.refresh_from_db()
        assert job.status == "queued"
        task = tasks.extract_job_features
        if stage == "queued_for_training":
            job.stage = "training"  # as when the features are already cached
            job.save(update_fields=["stage"])
            task = tasks.train_job
    job_cancel(job=job, user=user)
    assert len(callbacks) == 1
    assert task.apply(args=[job.id]).get() == "skipped"
    job.refresh_from_db()
    assert job.status == "cancelled"
    assert job.finished_at is not None
    assert not Adapter.objects.exists()


def test_cancel_during_extraction_stops_it(
    tiny_base_model: Any,
    django_capture_on_commit_callbacks: Any,
    quick_heartbeat: None,
    monkeypatch: Any,
) -> None:
    """Extraction checks for cancellation between batches and stops without a result."""
    user = UserFactory()
    original = pipeline.job_record_progress

    def cancel_on_first_beat(**kwargs: Any) -> bool:
        job_cancel(job=FineTuningJob.objects.get(pk=kwargs["job"].pk), user=user)
        return original(**kwargs)

    monkeypatch.setattr("workers.runtime.job_record_progress", cancel_on_first_beat)
    job = _run(django_capture_on_commit_callbacks, user=user, file=FileFactory(owner=user))
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
    job = _run(django_capture_on_commit_callbacks, user=user, file=FileFactory(owner=user))
    assert job.status == "cancelled"
    assert max(seen) <= 4
    assert not Adapter.objects.exists()
    assert not list(data_path("adapters").glob(f"{job.id}*"))
    assert any(m.startswith("Job was cancelled") for m in _messages(job))


def test_bad_data_fails_the_job_with_a_clear_error(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """An example longer than the job's max_length fails validation, naming its line."""
    user = UserFactory()
    job = _run(
        django_capture_on_commit_callbacks,
        user=user,
        file=FileFactory(owner=user),
        carry_on={**TINY, "max_length": 16},
    )
    assert job.status == "failed"
    assert job.error["code"] == "invalid_training_file"
    assert job.error["param"] == "training_file"
    assert "line 1:" in job.error["message"]
    assert "the limit is 16" in job.error["message"]


def test_incompatible_base_fails_the_job(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """A base whose files no longer match its registered fingerprint is refused clearly."""
    tiny_base_model.fingerprint_key = "0" * 32
    tiny_base_model.save()
    user = UserFactory()
    job = _run(django_capture_on_commit_callbacks, user=user, file=FileFactory(owner=user))
    assert job.status == "failed"
    assert job.error["code"] == "incompatible_base_model"
    assert "no longer match" in job.error["message"]


def test_transient_database_error_is_retried(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any, monkeypatch: Any
) -> None:
    """An OperationalError releases the claim and the task is retried, then succeeds."""
    user = UserFactory()
    calls: list[int] = []
    original = tasks.job_validate_files

    def flaky(**kwargs: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("server closed the connection unexpectedly")
        original(**kwargs)

    monkeypatch.setattr(tasks, "job_validate_files", flaky)
    job = _run(django_capture_on_commit_callbacks, user=user, file=FileFactory(owner=user))
    assert len(calls) == 2
    assert job.status == "succeeded", job.error


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing in the task may catch it."""


def test_stale_training_is_swept_and_resumes_from_its_checkpoint(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any, monkeypatch: Any
) -> None:
    """A training task that died after a checkpoint is re-queued by the sweep and resumes."""
    user = UserFactory()
    original = tasks.checkpoint_record

    def die_after_first_checkpoint(**kwargs: Any) -> Checkpoint:
        original(**kwargs)
        raise _Killed()

    monkeypatch.setattr(tasks, "checkpoint_record", die_after_first_checkpoint)
    with pytest.raises(_Killed):
        _run(django_capture_on_commit_callbacks, user=user, file=FileFactory(owner=user))
    job = FineTuningJob.objects.get()
    assert job.status == "running"
    assert job.stage == "training"
    assert list(job.checkpoints.values_list("step", flat=True)) == [2]

    monkeypatch.setattr(tasks, "checkpoint_record", original)
    assert pipeline.job_sweep_stale() == []  # its heartbeat is still fresh
    FineTuningJob.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
    with django_capture_on_commit_callbacks(execute=True):
        assert pipeline.job_sweep_stale() == [job.id]
    job.refresh_from_db()
    assert job.status == "succeeded", job.error
    messages = _messages(job)
    assert any("stopped responding during training" in m for m in messages)
    assert "Resuming training from the checkpoint at step 2" in messages
    assert list(job.checkpoints.order_by("step").values_list("step", flat=True)) == [4, 6, 8]
    steps = [e.data["step"] for e in job.events.filter(type="metrics") if "train_loss" in e.data]
    assert sorted(steps) == list(range(1, 9))  # replayed steps are not counted twice


def test_a_job_whose_worker_keeps_dying_fails(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any, settings: Any
) -> None:
    """After MAX_ATTEMPTS lost workers the job fails with worker_lost, never stuck."""
    settings.CARRY_ON = {**settings.CARRY_ON, "MAX_ATTEMPTS": 1}
    user = UserFactory()
    with django_capture_on_commit_callbacks(execute=False):
        job = _create(user=user, file=FileFactory(owner=user))
    FineTuningJob.objects.filter(pk=job.pk).update(
        status="running",
        stage="training",
        worker="dead:1:x",
        attempts=1,
        heartbeat_at=timezone.now() - timedelta(hours=1),
    )
    assert tasks.train_job.apply(args=[job.id]).get() == "skipped"
    job.refresh_from_db()
    assert job.status == "failed"
    assert job.error["code"] == "worker_lost"


def test_a_live_claim_is_not_taken_by_a_second_worker(tiny_base_model: Any) -> None:
    """Two workers never run the same stage: the second claim fails while the first is alive."""
    user = UserFactory()
    job = FineTuningJob.objects.create(
        owner=user,
        base=tiny_base_model,
        training_file=FileFactory(owner=user),
        status="queued",
        stage="training",
    )
    assert pipeline.job_claim(job_id=job.id, stage="training", worker="a") is not None
    assert pipeline.job_claim(job_id=job.id, stage="training", worker="b") is None
    assert pipeline.job_claim(job_id=job.id, stage="extracting", worker="b") is None
    assert pipeline.job_heartbeat(job_id=job.id, worker="a")
    assert not pipeline.job_heartbeat(job_id=job.id, worker="b")


def test_validation_split_is_shared_by_jobs_with_different_seeds(tiny_base_model: Any) -> None:
    """The held-out split does not depend on the job's seed, so its features are reusable."""
    user = UserFactory()
    file = FileFactory(owner=user, content=toy_jsonl(30))
    one = FineTuningJob.objects.create(owner=user, base=tiny_base_model, training_file=file, seed=1)
    two = FineTuningJob.objects.create(owner=user, base=tiny_base_model, training_file=file, seed=2)
    first, second = pipeline.job_splits(one), pipeline.job_splits(two)
    assert first.train_digest == second.train_digest
    assert [e.line for e in first.valid] == [e.line for e in second.valid]
    assert len(first.valid) == 3


@pytest.mark.parametrize("area", ["features", "adapters"])
def test_unwritable_artifact_storage_fails_the_job_with_a_clear_error(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any, data_dir: Any, area: str
) -> None:
    """Storage that refuses writes fails the job with storage_error; nothing is registered."""
    data_path(area).parent.mkdir(parents=True, exist_ok=True)
    data_path(area).write_bytes(b"")  # a file where a folder must be: every write fails
    user = UserFactory()
    job = _run(django_capture_on_commit_callbacks, user=user, file=FileFactory(owner=user))
    assert job.status == "failed"
    assert job.error["code"] == "storage_error"
    assert f"({area})" in job.error["message"]
    assert str(data_dir) not in job.error["message"]  # server paths stay private
    assert not Adapter.objects.exists()
    if area == "features":
        assert not FeatureSet.objects.filter(status="ready").exists()


def test_a_job_whose_message_was_lost_is_sent_again(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any, settings: Any
) -> None:
    """An unclaimed job older than REQUEUE_AFTER is sent again, once per period, and runs."""
    settings.CARRY_ON = {**settings.CARRY_ON, "REQUEUE_AFTER": 60}
    user = UserFactory()
    with django_capture_on_commit_callbacks(execute=False):  # the message is lost
        job = _create(user=user, file=FileFactory(owner=user))
    assert pipeline.job_sweep_unclaimed() == []  # too recent to tell from a slow queue
    FineTuningJob.objects.filter(pk=job.pk).update(
        updated_at=timezone.now() - timedelta(seconds=61)
    )
    with django_capture_on_commit_callbacks(execute=True):
        assert pipeline.job_sweep_unclaimed() == [job.id]
    job.refresh_from_db()
    assert job.status == "succeeded", job.error
    assert pipeline.job_sweep_unclaimed() == []


def test_a_continued_job_whose_parent_was_deleted_fails_clearly(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any, make_adapter: Any
) -> None:
    """The parent deleted between creation and training: the job fails naming it, instead of
    quietly training from scratch; the job keeps the parent's name."""
    from webapp.customizations.services.adapters import adapter_delete

    user = UserFactory()
    parent = make_adapter(user, tiny_base_model, seed=1)
    file = FileFactory(owner=user)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        job = job_create(user=user, training_file=file.id, model=parent.name, hyperparameters=HYPER)
    adapter_delete(adapter=parent)
    with django_capture_on_commit_callbacks(execute=True):
        for callback in callbacks:
            callback()
    job.refresh_from_db()
    assert job.status == "failed"
    assert job.error is not None
    assert (job.error["code"], job.error["param"]) == ("parent_model_deleted", "model")
    assert parent.name in job.error["message"]
    assert (job.parent, job.parent_model) == (None, parent.name)


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
    adapter = pipeline.job_succeed(
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
