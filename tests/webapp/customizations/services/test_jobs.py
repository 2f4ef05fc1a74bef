from __future__ import annotations

from typing import Any

import pytest

from tests.factories import FileFactory, FineTuningJobFactory, UserFactory
from tests.helpers.carry_on_kit import toy_jsonl
from webapp.core.exceptions import ApplicationError, ConflictError
from webapp.customizations.models import FineTuningJob
from webapp.customizations.services.jobs import (
    ALLOWED_TRANSITIONS,
    job_cancel,
    job_create,
    job_retry,
    job_transition,
)

pytestmark = pytest.mark.django_db
Status = FineTuningJob.Status


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"model": "no-such-base"}, "model"),
        ({"training_file": "file-doesnotexist"}, "training_file"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"batch_size": "big"}}, "hyperparameters.batch_size"),
        ({"hyperparameters": {"momentum": 0.9}}, "hyperparameters.momentum"),
        ({"suffix": "has:colon"}, "suffix"),
        ({"seed": -1}, "seed"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"carry_on": {"d_model": 30, "n_heads": 4}}, "carry_on"),
        ({"carry_on": {"wings": 2}}, "carry_on.wings"),
    ],
)
def test_job_create_refuses_bad_requests_naming_the_param(
    tiny_base_model: Any, overrides: dict[str, Any], param: str
) -> None:
    """Each invalid argument raises an ApplicationError whose param names it."""
    user = UserFactory()
    arguments = {"user": user, "training_file": FileFactory(owner=user).id, **overrides}
    with pytest.raises(ApplicationError) as caught:
        job_create(**arguments)
    assert caught.value.param == param
    assert caught.value.status == 400
    assert not FineTuningJob.objects.exists()


def test_job_create_refuses_a_file_that_failed_validation(tiny_base_model: Any) -> None:
    """A file with problems cannot be trained on; the error quotes its first problem."""
    user = UserFactory()
    bad = FileFactory(owner=user, content=b"oops\n")
    with pytest.raises(ApplicationError, match="line 1") as caught:
        job_create(user=user, training_file=bad.id)
    assert caught.value.param == "training_file"


def test_job_create_enqueues_validation_only_on_commit(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any, monkeypatch: Any
) -> None:
    """Nothing is sent to the broker until the job's transaction commits."""
    from workers import tasks

    sent: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(
        tasks.validate_job_files, "apply_async", lambda args: sent.append(("validate", args))
    )
    user = UserFactory()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        job = job_create(user=user, training_file=FileFactory(owner=user).id, suffix="s1")
        assert sent == []
    assert job.status == Status.VALIDATING_FILES
    assert job.suffix == "s1"
    assert job.hyperparameters == {
        "n_epochs": "auto",
        "batch_size": "auto",
        "learning_rate_multiplier": "auto",
    }
    assert len(callbacks) == 1
    callbacks[0]()
    assert sent == [("validate", [job.id])]


def test_job_ids_are_openai_style_public_ids(tiny_base_model: Any) -> None:
    """Jobs, files, events and checkpoints get prefixed 24-character random ids."""
    job = FineTuningJobFactory()
    assert job.id.startswith("ftjob-")
    assert len(job.id) == len("ftjob-") + 24
    assert job.training_file.id.startswith("file-")


@pytest.mark.parametrize("start", [s.value for s in Status])
def test_only_allowed_transitions_happen(tiny_base_model: Any, start: str) -> None:
    """Every (from, to) pair not in the status machine raises ConflictError."""
    for target in Status.values:
        job = FineTuningJobFactory(status=start)
        if target in ALLOWED_TRANSITIONS[start]:
            assert job_transition(job=job, to=target)
            job.refresh_from_db()
            assert job.status == target
        else:
            with pytest.raises(ConflictError):
                job_transition(job=job, to=target)
            job.refresh_from_db()
            assert job.status == start


def test_transition_loses_to_a_concurrent_change(tiny_base_model: Any) -> None:
    """A transition from a stale in-memory status does nothing (the UPDATE is conditional)."""
    job = FineTuningJobFactory(status=Status.RUNNING)
    FineTuningJob.objects.filter(pk=job.pk).update(status=Status.CANCELLED)
    assert not job_transition(job=job, to=Status.SUCCEEDED)
    job.refresh_from_db()
    assert job.status == Status.CANCELLED


@pytest.mark.parametrize("status", ["validating_files", "queued", "running"])
def test_cancel_works_at_every_unfinished_status(tiny_base_model: Any, status: str) -> None:
    """Cancel moves a waiting or running job to cancelled and records an event."""
    user = UserFactory()
    job = FineTuningJobFactory(owner=user, status=status, worker="w")
    job_cancel(job=job, user=user)
    job.refresh_from_db()
    assert job.status == Status.CANCELLED
    assert job.worker == ""
    assert job.finished_at is not None
    assert job.events.filter(message=f"Job was cancelled by {user.username}").exists()


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_cancel_of_a_finished_job_is_refused(tiny_base_model: Any, status: str) -> None:
    """A finished job cannot be cancelled."""
    job = FineTuningJobFactory(status=status)
    with pytest.raises(ConflictError):
        job_cancel(job=job)


def test_retry_sends_a_failed_job_back_to_validation(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """Retry clears the error, resets progress and enqueues validation on commit."""
    job = FineTuningJobFactory(status=Status.FAILED, error={"code": "x", "message": "m"})
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        job_retry(job=job)
    job.refresh_from_db()
    assert job.status == Status.VALIDATING_FILES
    assert job.error is None
    assert len(callbacks) == 1
    with pytest.raises(ConflictError):
        job_retry(job=FineTuningJobFactory(status=Status.SUCCEEDED))


def test_auto_hyperparameters_resolve_from_the_data(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any
) -> None:
    """After validation every "auto" is a number, from the data and the defaults."""
    from workers import tasks

    user = UserFactory()
    # The smallest file a job takes: 10 examples, 1 held out, 9 to train on.
    file = FileFactory(owner=user, content=toy_jsonl(10))
    with django_capture_on_commit_callbacks(execute=False):
        job = job_create(user=user, training_file=file.id, carry_on={"d_model": 16, "n_heads": 2})
        tasks.validate_job_files.apply(args=[job.id])
    job.refresh_from_db()
    assert job.status == Status.QUEUED
    assert job.stage == "extracting"
    assert job.hyperparameters == {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0}
    assert job.carry_on["max_length"] == file.max_example_tokens
    assert job.carry_on["checkpoint_every"] >= 1


def test_a_job_with_no_options_trains_the_core_default_carry_on(tiny_base_model: Any) -> None:
    """The web defaults are customization.config's: the ladder for the job's base, its lr."""
    from customization.config import CarryOnConfig, TrainingConfig, default_taps
    from webapp.customizations.services.planning import job_carry_on_config, job_training_config

    user = UserFactory()
    file = FileFactory(owner=user, content=toy_jsonl(12))
    job = job_create(user=user, training_file=file.id)
    layers = tiny_base_model.fingerprint["num_layers"]
    assert job.carry_on["taps"] == list(default_taps(layers))
    shape, default = job_carry_on_config(job), CarryOnConfig()
    assert (shape.tap_mode, shape.d_model, shape.n_blocks) == (
        default.tap_mode,
        default.d_model,
        default.n_blocks,
    )
    job.hyperparameters = {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0}
    job.carry_on = {**job.carry_on, "checkpoint_every": 0}
    assert job_training_config(job).learning_rate == TrainingConfig().learning_rate


def test_job_create_answers_503_and_keeps_nothing_when_the_broker_is_down(
    tiny_base_model: Any, django_capture_on_commit_callbacks: Any, monkeypatch: Any
) -> None:
    """A broker that refuses the task: ServiceUnavailableError, and the job is withdrawn."""
    from kombu.exceptions import OperationalError

    from webapp.core.exceptions import ServiceUnavailableError
    from workers import tasks

    def refuse(**_: Any) -> None:
        raise OperationalError("Error 111 connecting to 127.0.0.1:1. Connection refused.")

    monkeypatch.setattr(tasks.validate_job_files, "apply_async", refuse)
    user = UserFactory()
    file = FileFactory(owner=user)
    with (
        pytest.raises(ServiceUnavailableError) as caught,
        django_capture_on_commit_callbacks(execute=True),
    ):
        job_create(user=user, training_file=file.id)
    assert caught.value.status == 503
    assert caught.value.code == "broker_unavailable"
    assert not FineTuningJob.objects.exists()
