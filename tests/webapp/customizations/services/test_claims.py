"""Claims and sweeps (services/claims.py), run through the eager tasks on a tiny base: a
stage runs once, a cancelled or moved-on job is skipped, a stalled or lost stage is sent again."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from tests.factories import FileFactory, UserFactory
from tests.helpers.eager_jobs import create_job, job_messages, run_job
from webapp.customizations.models import Adapter, Checkpoint, FineTuningJob
from webapp.customizations.services import claims
from webapp.customizations.services.jobs import job_cancel
from workers import tasks

pytestmark = pytest.mark.django_db


def test_task_reruns_are_idempotent(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """Running any stage's task again after the job finished changes nothing."""
    user = UserFactory()
    job = run_job(django_capture_on_commit_callbacks, user=user, file=FileFactory(owner=user))
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
        job = create_job(user=user, file=file)
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
        run_job(django_capture_on_commit_callbacks, user=user, file=FileFactory(owner=user))
    job = FineTuningJob.objects.get()
    assert job.status == "running"
    assert job.stage == "training"
    assert list(job.checkpoints.values_list("step", flat=True)) == [2]

    monkeypatch.setattr(tasks, "checkpoint_record", original)
    assert claims.job_sweep_stale() == []  # its heartbeat is still fresh
    FineTuningJob.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
    with django_capture_on_commit_callbacks(execute=True):
        assert claims.job_sweep_stale() == [job.id]
    job.refresh_from_db()
    assert job.status == "succeeded", job.error
    messages = job_messages(job)
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
        job = create_job(user=user, file=FileFactory(owner=user))
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
    assert claims.job_claim(job_id=job.id, stage="training", worker="a") is not None
    assert claims.job_claim(job_id=job.id, stage="training", worker="b") is None
    assert claims.job_claim(job_id=job.id, stage="extracting", worker="b") is None
    assert claims.job_heartbeat(job_id=job.id, worker="a")
    assert not claims.job_heartbeat(job_id=job.id, worker="b")


def test_a_job_whose_message_was_lost_is_sent_again(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any, settings: Any
) -> None:
    """An unclaimed job older than REQUEUE_AFTER is sent again, once per period, and runs."""
    settings.CARRY_ON = {**settings.CARRY_ON, "REQUEUE_AFTER": 60}
    user = UserFactory()
    with django_capture_on_commit_callbacks(execute=False):  # the message is lost
        job = create_job(user=user, file=FileFactory(owner=user))
    assert claims.job_sweep_unclaimed() == []  # too recent to tell from a slow queue
    FineTuningJob.objects.filter(pk=job.pk).update(
        updated_at=timezone.now() - timedelta(seconds=61)
    )
    with django_capture_on_commit_callbacks(execute=True):
        assert claims.job_sweep_unclaimed() == [job.id]
    job.refresh_from_db()
    assert job.status == "succeeded", job.error
    assert claims.job_sweep_unclaimed() == []
