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
import math
import secrets
import time
from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from customization.config import CarryOnConfig, TrainingConfig, default_taps
from webapp.accounts.models import User
from webapp.core.exceptions import ApplicationError, ConflictError, ServiceUnavailableError
from webapp.core.utils import remove_artifact
from webapp.customizations.models import BaseModel, File, FineTuningJob, JobEvent

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

# The web app's defaults are the core's (customization.config), so a job submitted with
# no options trains exactly the carry-on the quality study picked (docs/carry_on_quality.md).
_TRAINING = TrainingConfig()
_SHAPE = CarryOnConfig()
# The carry-on's peak learning rate at learning_rate_multiplier = 1.
BASE_LEARNING_RATE = _TRAINING.learning_rate
AUTO_HYPERPARAMETERS = {
    "n_epochs": _TRAINING.epochs,
    "batch_size": _TRAINING.batch_size,
    "learning_rate_multiplier": 1.0,
}
HYPERPARAMETER_RANGES: dict[str, tuple[type, float, float]] = {
    "n_epochs": (int, 1, 50),
    "batch_size": (int, 1, 256),
    "learning_rate_multiplier": (float, 1e-3, 10.0),
}
CARRY_ON_DEFAULTS: dict[str, Any] = {
    # the carry-on's shape (customization.config.CarryOnConfig); "auto" taps: the default
    # ladder for the job's base (customization.config.default_taps)
    "d_model": _SHAPE.d_model,
    "n_blocks": _SHAPE.n_blocks,
    "n_heads": _SHAPE.n_heads,
    "mlp_ratio": _SHAPE.mlp_ratio,
    "taps": "auto",
    "tap_mode": _SHAPE.tap_mode,
    "alpha": _SHAPE.alpha,
    "dropout": _SHAPE.dropout,
    # feature extraction (part of the feature-cache key)
    "max_length": "auto",
    "storage_dtype": "float16",
    # training extras
    "checkpoint_every": "auto",
    "early_stopping_patience": 0,
}
_SHAPE_KEYS = (
    "d_model",
    "n_blocks",
    "n_heads",
    "mlp_ratio",
    "taps",
    "tap_mode",
    "alpha",
    "dropout",
)
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
) -> FineTuningJob:
    """Validate the request, create the job and enqueue file validation once committed.

    If the broker does not take the task, the job is withdrawn (deleted) and
    ``ServiceUnavailableError`` (503) is raised: the caller retries, and no job waits for a
    message that was never sent.
    """
    base = _resolve_base(model)
    train = _resolve_file(user, training_file, "training_file")
    valid = _resolve_file(user, validation_file, "validation_file") if validation_file else None
    with transaction.atomic():
        job = FineTuningJob.objects.create(
            owner=user,
            base=base,
            training_file=train,
            validation_file=valid,
            hyperparameters=_check_hyperparameters(hyperparameters or {}),
            carry_on=_check_carry_on(carry_on or {}, base=base),
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


def _check_hyperparameters(values: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(values, Mapping):
        raise ApplicationError("hyperparameters must be an object", param="hyperparameters")
    unknown = sorted(set(values) - set(HYPERPARAMETER_RANGES))
    if unknown:
        raise ApplicationError(
            f"unknown hyperparameter {unknown[0]!r}; allowed: {', '.join(HYPERPARAMETER_RANGES)}",
            param=f"hyperparameters.{unknown[0]}",
        )
    checked: dict[str, Any] = {}
    for name, (kind, low, high) in HYPERPARAMETER_RANGES.items():
        value = values.get(name, "auto")
        param = f"hyperparameters.{name}"
        if value == "auto":
            checked[name] = "auto"
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ApplicationError(f"{name} must be 'auto' or a number", param=param)
        if not math.isfinite(value):
            raise ApplicationError(f"{name} must be a finite number", param=param)
        if kind is int and value != int(value):
            raise ApplicationError(f"{name} must be an integer", param=param)
        if not low <= value <= high:
            raise ApplicationError(f"{name} must be between {low} and {high}", param=param)
        checked[name] = kind(value)
    return checked


def _check_carry_on(values: Mapping[str, Any], *, base: BaseModel | None = None) -> dict[str, Any]:
    from customization.config import FeatureConfig

    if not isinstance(values, Mapping):
        raise ApplicationError("carry_on must be an object", param="carry_on")
    unknown = sorted(set(values) - set(CARRY_ON_DEFAULTS))
    if unknown:
        raise ApplicationError(
            f"unknown carry_on option {unknown[0]!r}; allowed: {', '.join(CARRY_ON_DEFAULTS)}",
            param=f"carry_on.{unknown[0]}",
        )
    _check_carry_on_types(values)
    options = {**CARRY_ON_DEFAULTS, **values}
    if options["taps"] == "auto":
        options["taps"] = list(resolve_default_taps(base))
    try:
        shape = {key: options[key] for key in _SHAPE_KEYS}
        shape["taps"] = tuple(shape["taps"])
        CarryOnConfig(**shape)
        FeatureConfig(
            taps=shape["taps"],
            max_length=512 if options["max_length"] == "auto" else options["max_length"],
            storage_dtype=options["storage_dtype"],
        )
    except (TypeError, ValueError) as exc:
        raise ApplicationError(f"invalid carry_on options: {exc}", param="carry_on") from None
    for key in ("max_length", "checkpoint_every"):
        value = options[key]
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ApplicationError(f"{key} must be 'auto' or an integer", param=f"carry_on.{key}")
    patience = options["early_stopping_patience"]
    if isinstance(patience, bool) or not isinstance(patience, int) or not 0 <= patience <= 100:
        raise ApplicationError(
            "early_stopping_patience must be an integer in [0, 100]",
            param="carry_on.early_stopping_patience",
        )
    options["taps"] = list(shape["taps"])
    _check_carry_on_size(options, base)
    return options


def resolve_default_taps(base: BaseModel | None) -> tuple[int, ...]:
    """The default ladder's taps for ``base`` (the bundled base's when its depth is unknown)."""
    layers = int((base.fingerprint if base else {}).get("num_layers") or 0)
    return default_taps(layers) if layers else CarryOnConfig().taps


_CARRY_ON_TYPES: dict[str, tuple[type, ...]] = {
    "d_model": (int,),
    "n_blocks": (int,),
    "n_heads": (int,),
    "mlp_ratio": (int, float),
    "alpha": (int, float),
    "dropout": (int, float),
    "tap_mode": (str,),
    "storage_dtype": (str,),
}


def _check_carry_on_types(values: Mapping[str, Any]) -> None:
    """JSON types first, so a wrong one is a 400 here rather than a failed job later."""
    for key, kinds in _CARRY_ON_TYPES.items():
        value = values.get(key)
        if key in values and (isinstance(value, bool) or not isinstance(value, kinds)):
            kind = (
                "a string" if kinds == (str,) else "an integer" if kinds == (int,) else "a number"
            )
            raise ApplicationError(f"{key} must be {kind}", param=f"carry_on.{key}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ApplicationError(f"{key} must be a finite number", param=f"carry_on.{key}")
    taps = values.get("taps", [])
    if taps == "auto":
        return
    if not isinstance(taps, list | tuple) or not all(
        isinstance(t, int) and not isinstance(t, bool) and abs(t) <= 4096 for t in taps
    ):
        raise ApplicationError(
            'taps must be "auto" or a list of layer indices', param="carry_on.taps"
        )


def _check_carry_on_size(options: Mapping[str, Any], base: BaseModel | None) -> None:
    """Refuse a carry-on too large for any worker (it would only run out of memory there)."""
    d, hidden = (
        int(options["d_model"]),
        int((base.fingerprint if base else {}).get("hidden_size", 0)),
    )
    blocks = int(options["n_blocks"]) * (4 + 3 * float(options["mlp_ratio"])) * d * d
    estimate = int(blocks + (len(options["taps"]) + 2) * hidden * d)
    limit = int(settings.CARRY_ON["MAX_CARRY_ON_PARAMETERS"])
    if estimate > limit:
        raise ApplicationError(
            f"this carry-on would have about {estimate:,} parameters; the limit is {limit:,}",
            param="carry_on",
            code="carry_on_too_large",
        )


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
    now = timezone.now()
    values: dict[str, Any] = {"status": to, "updated_at": now, **fields}
    if to in FineTuningJob.TERMINAL:
        values.setdefault("finished_at", now)
        values.setdefault("worker", "")
    rows = FineTuningJob.objects.filter(pk=job.pk, status=job.status)
    if only_worker is not None:
        rows = rows.filter(worker=only_worker)
    if not rows.update(**values):
        return False
    for name, value in values.items():
        setattr(job, name, value)
    return True


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
    folder = f"jobs/{job.id}"
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
    "validating": "validate_job_files",
    FineTuningJob.Stage.EXTRACTING: "extract_job_features",
    FineTuningJob.Stage.TRAINING: "train_job",
}


def send_stage(*, job_id: str, stage: str) -> None:
    """Send the stage's task now; ServiceUnavailableError (503) when the broker refuses it."""
    from kombu.exceptions import OperationalError as BrokerError

    from workers import tasks  # torch-free at import; routes pick the queue

    try:
        getattr(tasks, STAGE_TASKS[stage]).apply_async(args=[job_id])
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
    (pipeline.job_sweep_unclaimed) sends it again after REQUEUE_AFTER.
    """

    def send() -> None:
        with contextlib.suppress(ServiceUnavailableError):  # logged; the sweep sends it again
            send_stage(job_id=job_id, stage=stage)

    transaction.on_commit(send)


def job_model_name(job: FineTuningJob) -> str:
    """``ft:<base>:<owner>:<suffix>:<job id>``, the adapter's name."""
    owner = "".join(c if c.isalnum() or c in "-_." else "-" for c in job.owner.username)[:40]
    return f"ft:{job.base.name}:{owner}:{job.suffix}:{job.id}"
