"""Fine-tuning jobs: creation (validated like OpenAI's API), the status machine, cancel, retry.

Status machine::

    validating_files -> queued -> running -> succeeded | failed | cancelled
    (cancel from validating_files, queued or running; retry: failed -> validating_files)

Every transition is a conditional UPDATE on the current status, so a worker finishing a job
and a user cancelling it cannot both win.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import Mapping
from typing import Any

from django.db import transaction

from webapp.accounts.models import User
from webapp.celery import task_send
from webapp.core.exceptions import ApplicationError, ConflictError, ServiceUnavailableError
from webapp.core.models import status_update
from webapp.customizations.artifacts import job_folder, remove_artifact
from webapp.customizations.models import Adapter, BaseModel, File, FineTuningJob, JobEvent
from webapp.customizations.quotas import quota_check_active_jobs
from webapp.customizations.services.job_options import (
    check_hyperparameters,
    job_adapter_options,
)

logger = logging.getLogger(__name__)
Status = FineTuningJob.Status

ALLOWED_TRANSITIONS: dict[str, frozenset[str]] = {
    Status.VALIDATING_FILES: frozenset({Status.QUEUED, Status.FAILED, Status.CANCELLED}),
    Status.QUEUED: frozenset({Status.RUNNING, Status.FAILED, Status.CANCELLED}),
    Status.RUNNING: frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED}),
    Status.FAILED: frozenset({Status.VALIDATING_FILES}),  # an operator's retry
    Status.SUCCEEDED: frozenset(),
    Status.CANCELLED: frozenset(),
}
CANCELLABLE = (Status.VALIDATING_FILES, Status.QUEUED, Status.RUNNING)

_SUFFIX_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


# -- creation ---------------------------------------------------------------------------------


def job_create(
    *,
    user: User,
    training_file: str | File,
    model: str | BaseModel | None = None,
    validation_file: str | File | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    suffix: str | None = None,
    seed: int | None = None,
    metadata: Mapping[str, Any] | None = None,
    carry_on: Mapping[str, Any] | None = None,
    preset: str | None = None,
    tail: Mapping[str, Any] | None = None,
) -> FineTuningJob:
    """Validate the request, create the job and enqueue file validation once committed.

    A job trains one adapter kind (docs/architecture.md, "Two adapter kinds"): a carry-on
    (``carry_on`` options) or a tail (``tail`` options). A ``preset`` picks the kind and fills
    defaults; options given with it win over the preset's. A ``model`` naming one of the
    user's adapters continues it, as OpenAI's API does: the same base, kind, shape and preset,
    starting from its weights.

    If the broker does not take the task, the job is withdrawn (deleted) and
    ``ServiceUnavailableError`` (503) is raised: the caller retries, and no job waits for a
    message that was never sent.
    """
    parent = _resolve_parent(user, model)
    base = _resolve_base(parent.base if parent is not None else model)
    train = _resolve_file(user, training_file, "training_file")
    _check_training_size(train)
    valid = _resolve_file(user, validation_file, "validation_file") if validation_file else None
    preset_name, kind, shape = job_adapter_options(
        parent=parent, base=base, preset=preset, carry_on=carry_on, tail=tail
    )
    with transaction.atomic():
        quota_check_active_jobs(user=user)
        job = FineTuningJob.objects.create(
            owner=user,
            base=base,
            parent=parent,
            parent_model=parent.name if parent is not None else "",
            training_file=train,
            validation_file=valid,
            hyperparameters=check_hyperparameters(hyperparameters or {}),
            kind=kind,
            preset=preset_name,
            **shape,
            suffix=_check_suffix(suffix),
            seed=_check_seed(seed),
            metadata=_check_metadata(metadata),
        )
        job_event_create(job=job, message=f"Validating training file: {train.id}")
        transaction.on_commit(lambda: _send_or_withdraw(job.id))
    return job


def _send_or_withdraw(job_id: str) -> None:
    try:
        send_stage(job_id=job_id, stage="validating")
    except ServiceUnavailableError:
        # Still untouched by any worker (none got a message): take the job back.
        FineTuningJob.objects.filter(pk=job_id, status=Status.VALIDATING_FILES, worker="").delete()
        raise


def _resolve_base(model: str | BaseModel | None) -> BaseModel:
    if isinstance(model, BaseModel):
        base: BaseModel | None = model if model.enabled else None
    elif model:
        base = BaseModel.objects.filter(name=model, enabled=True).first()
    else:
        base = BaseModel.objects.filter(is_default=True, enabled=True).first()
    if base is None:
        shown = model.name if isinstance(model, BaseModel) else model
        message = (
            f"The model {shown!r} does not exist or cannot be fine-tuned"
            if shown
            else "No default base model is registered"
        )
        raise ApplicationError(message, param="model", code="model_not_available")
    return base


def _resolve_parent(user: User, model: str | BaseModel | None) -> Adapter | None:
    """The user's adapter a fine-tuned ``model`` name (``ft:...``) continues; None for a base.

    Another user's adapter answers 404 exactly as a missing one does (never tell which). A
    checkpoint is servable but not a parent: its job's fine-tuned model is.
    """
    from webapp.customizations.selectors import adapter_list, model_resolve

    if not isinstance(model, str) or not model.startswith("ft:"):
        return None
    adapter = adapter_list(user=user).filter(name=model).first()
    if adapter is not None:
        return adapter
    model_resolve(user=user, name=model)  # NotFoundError (404) unless it is theirs
    raise ApplicationError(
        f"{model} is a checkpoint; continue fine-tuning from its job's fine-tuned model "
        "instead (a checkpoint cannot be a job's model)",
        param="model",
        code="model_not_available",
    )


# OpenAI refuses a training file with fewer examples: too few to learn from, and a user
# would rather hear so at once than from a job that ran.
MIN_TRAINING_EXAMPLES = 10


def _check_training_size(file: File) -> None:
    if file.n_examples < MIN_TRAINING_EXAMPLES:
        raise ApplicationError(
            f"Training file {file.id} has {file.n_examples} example(s), but must have at "
            f"least {MIN_TRAINING_EXAMPLES} examples",
            param="training_file",
            code="invalid_n_examples",
        )


def _resolve_file(user: User, value: str | File, param: str) -> File:
    from webapp.customizations.selectors import file_list

    file_id = value.id if isinstance(value, File) else str(value)
    file = file_list(user=user).filter(id=file_id).first()
    if file is None:
        raise ApplicationError(f"invalid {param}: {file_id}", param=param, code="invalid_file")
    if file.purpose != "fine-tune":
        raise ApplicationError(
            f"{file_id} has purpose {file.purpose!r}, not 'fine-tune'", param=param
        )
    if file.status != File.Status.PROCESSED:
        raise ApplicationError(
            f"{file_id} did not pass validation: {_first_problem(file)}",
            param=param,
            code=f"invalid_{param}",
        )
    return file


def _first_problem(file: File) -> str:
    problems = file.problems
    if not problems:
        return "it is not processed yet"
    first = problems[0]
    where = f"line {first['line']}: " if first.get("line") else ""
    return f"{where}{first['message']} ({len(problems)} problem(s) in all)"


def _check_suffix(suffix: str | None) -> str:
    if suffix is None or suffix == "":
        return ""
    if not isinstance(suffix, str) or len(suffix) > 64 or not set(suffix) <= _SUFFIX_CHARS:
        raise ApplicationError(
            "suffix must be at most 64 letters, digits, '-', '_' or '.'", param="suffix"
        )
    return suffix


def _check_seed(seed: int | None) -> int:
    if seed is None:
        return secrets.randbelow(2**31)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ApplicationError("seed must be an integer in [0, 2147483647]", param="seed")
    return seed


def _check_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or len(metadata) > 16:
        raise ApplicationError("metadata must be an object of at most 16 pairs", param="metadata")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ApplicationError("metadata keys and values must be strings", param="metadata")
        if len(key) > 64 or len(value) > 512:
            raise ApplicationError(
                "metadata keys are at most 64 and values at most 512 characters", param="metadata"
            )
    return dict(metadata)


# -- the status machine -------------------------------------------------------------------------


def job_transition(
    *, job: FineTuningJob, to: str, only_worker: str | None = None, **fields: Any
) -> bool:
    """Move ``job`` to status ``to`` if it is still in the status it was read with.

    Raises ``ConflictError`` for a transition the machine does not allow; returns False when
    the job moved on meanwhile (or, with ``only_worker``, is held by another worker).
    """
    if to not in ALLOWED_TRANSITIONS[job.status]:
        raise ConflictError(
            f"a {job.status} job cannot become {to}", param="status", code="invalid_transition"
        )
    return status_update(job, to, only_worker=only_worker, **fields)


def job_cancel(*, job: FineTuningJob, user: User | None = None) -> FineTuningJob:
    """Cancel at any stage; a running task notices at its next heartbeat and stops."""
    for _ in range(3):  # the status may change under us (e.g. queued -> running)
        if job.status not in CANCELLABLE:
            raise ConflictError(
                f"job {job.id} is {job.status} and cannot be cancelled", code="invalid_transition"
            )
        if job_transition(job=job, to=Status.CANCELLED):
            who = f" by {user.username}" if user is not None else ""
            job_event_create(job=job, message=f"Job was cancelled{who}", level="warn")
            return job
        job.refresh_from_db()
    raise ConflictError(f"job {job.id} changed while cancelling; try again")


def job_retry(*, job: FineTuningJob) -> FineTuningJob:
    """Run a failed job again from file validation; training resumes from its checkpoints."""
    with transaction.atomic():
        moved = job_transition(
            job=job,
            to=Status.VALIDATING_FILES,
            stage="",
            error=None,
            progress=0.0,
            worker="",
            heartbeat_at=None,
            attempts=0,
            requeues=0,
            finished_at=None,
        )
        if not moved:
            raise ConflictError(f"job {job.id} changed meanwhile; try again")
        job_event_create(job=job, message="Job was retried")
        enqueue_stage(job_id=job.id, stage="validating")
    return job


def job_delete(*, job: FineTuningJob) -> None:
    """Delete a finished job with its events, checkpoints and their artifacts."""
    if not job.is_terminal:
        raise ConflictError(f"job {job.id} is {job.status}; cancel it first")
    folder = job_folder(job.id)
    with transaction.atomic():
        job.delete()
        transaction.on_commit(lambda: remove_artifact(folder))


# -- events and enqueueing --------------------------------------------------------------------


def job_event_create(
    *,
    job: FineTuningJob,
    message: str,
    level: str = JobEvent.Level.INFO,
    type: str = JobEvent.Type.MESSAGE,
    data: Mapping[str, Any] | None = None,
) -> JobEvent:
    # Nanosecond clock as the order: unique enough per job, and needs no read-modify-write.
    return JobEvent.objects.create(
        job=job, message=message, level=level, type=type, data=dict(data or {}), seq=time.time_ns()
    )


STAGE_TASKS = {
    "validating": "workers.tasks.validate_job_files",
    FineTuningJob.Stage.EXTRACTING: "workers.tasks.extract_job_features",
    FineTuningJob.Stage.TRAINING: "workers.tasks.train_job",
}


def send_stage(*, job_id: str, stage: str) -> None:
    """Send the stage's task now; ServiceUnavailableError (503) when the broker refuses it."""
    from kombu.exceptions import OperationalError as BrokerError

    try:
        task_send(STAGE_TASKS[stage], args=[job_id])
    except (BrokerError, OSError) as exc:
        logger.warning("could not send %s of %s to the broker: %s", stage, job_id, exc)
        raise ServiceUnavailableError(
            "The job queue (message broker) is unreachable right now; nothing was created. "
            "Retry shortly.",
            code="broker_unavailable",
        ) from exc


def enqueue_stage(*, job_id: str, stage: str) -> None:
    """Send the stage's task once the current transaction commits (never a phantom job).

    A send the broker refuses leaves the job waiting with no message: the workers' sweep
    (claims.job_sweep_unclaimed) sends it again after REQUEUE_AFTER.
    """

    def send() -> None:
        with contextlib.suppress(ServiceUnavailableError):  # logged; the sweep sends it again
            send_stage(job_id=job_id, stage=stage)

    transaction.on_commit(send)
