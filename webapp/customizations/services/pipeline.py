"""What the Celery tasks record: claims, heartbeats, validation, features, progress, results.

A task claims its job with one conditional UPDATE (free, already its own, or its holder's
heartbeat is stale), so two workers never run the same stage of a job at once; a heartbeat
that finds the claim gone (cancelled, or taken over after a stall) tells the task to stop.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Case, F, Q, Value, When
from django.db.models.functions import Coalesce
from django.utils import timezone

from webapp.core.exceptions import ApplicationError
from webapp.core.utils import data_path, remove_artifact
from webapp.customizations.models import Adapter, Checkpoint, FeatureSet, FineTuningJob
from webapp.customizations.services.base_models import base_tokenizer
from webapp.customizations.services.files import feature_scope, file_read
from webapp.customizations.services.jobs import (
    AUTO_HYPERPARAMETERS,
    enqueue_stage,
    job_event_create,
    job_model_name,
    job_options,
    job_transition,
)

logger = logging.getLogger(__name__)
Status = FineTuningJob.Status
Stage = FineTuningJob.Stage
VALIDATING = "validating"
# Share of the progress bar given to extraction; training fills the rest.
EXTRACT_SHARE = 0.2
# Without a validation file, this share of the training file (at most this many) is held out.
VALID_FRACTION = 0.1
MAX_VALID_EXAMPLES = 64
SPLIT_SEED = 0  # fixed, so every job on one file shares the split and its cached features


def _timeout() -> timedelta:
    return timedelta(seconds=int(settings.CARRY_ON["HEARTBEAT_TIMEOUT"]))


# -- claims and heartbeats ----------------------------------------------------------------------


def job_claim(*, job_id: str, stage: str, worker: str) -> FineTuningJob | None:
    """Take the job for ``stage`` ("validating", "extracting", "training"), or None.

    None means there is nothing for this task to do: the job moved on, was cancelled, or a
    live worker holds it. A job whose worker died more than MAX_ATTEMPTS times fails.
    """
    now = timezone.now()
    if stage == VALIDATING:
        rows = FineTuningJob.objects.filter(pk=job_id, status=Status.VALIDATING_FILES)
    else:
        rows = FineTuningJob.objects.filter(
            pk=job_id, status__in=[Status.QUEUED, Status.RUNNING], stage=stage
        )
    rows = rows.filter(
        Q(worker="")
        | Q(worker=worker)
        | Q(heartbeat_at__isnull=True)
        | Q(heartbeat_at__lt=now - _timeout())
    )
    values: dict[str, Any] = {
        "worker": worker,
        "heartbeat_at": now,
        "updated_at": now,
        "attempts": Case(When(worker=worker, then=F("attempts")), default=F("attempts") + 1),
        "requeues": 0,
    }
    if stage != VALIDATING:
        values.update(status=Status.RUNNING, started_at=Coalesce(F("started_at"), Value(now)))
    if not rows.update(**values):
        return None
    job = FineTuningJob.objects.select_related(
        "base", "owner", "training_file", "validation_file", "train_features", "valid_features"
    ).get(pk=job_id)
    limit = int(settings.CARRY_ON["MAX_ATTEMPTS"])
    if job.attempts > limit:
        job_fail(
            job=job,
            worker=worker,
            code="worker_lost",
            message=(
                f"The worker running the {stage} stage stopped {job.attempts - 1} times "
                "(killed or out of memory); giving up."
            ),
        )
        return None
    return job


def job_release(*, job_id: str, worker: str) -> None:
    """Give the claim back (before a retry), so the next delivery may take it at once."""
    FineTuningJob.objects.filter(pk=job_id, worker=worker).update(worker="", heartbeat_at=None)


def job_heartbeat(*, job_id: str, worker: str) -> bool:
    """Refresh the claim; False when it is gone (cancelled, failed, or taken over)."""
    statuses = [Status.VALIDATING_FILES, Status.RUNNING]
    return bool(
        FineTuningJob.objects.filter(pk=job_id, worker=worker, status__in=statuses).update(
            heartbeat_at=timezone.now()
        )
    )


def job_sweep_stale() -> list[str]:
    """Re-enqueue the stage of every job whose worker stopped sending heartbeats.

    Training resumes from its newest checkpoint; extraction and validation simply restart
    (both are idempotent). Safe to run from every worker at once: the conditional UPDATE
    lets one sweeper win per stale job.
    """
    now = timezone.now()
    stale = now - _timeout()
    candidates = (
        FineTuningJob.objects.filter(
            status__in=[Status.VALIDATING_FILES, Status.RUNNING], heartbeat_at__lt=stale
        )
        .exclude(worker="")
        .values_list("pk", "worker", "stage")
    )
    swept: list[str] = []
    for job_id, worker, stage in list(candidates):
        with transaction.atomic():
            taken = FineTuningJob.objects.filter(
                pk=job_id, worker=worker, heartbeat_at__lt=stale
            ).update(worker="", heartbeat_at=now)
            if not taken:
                continue
            job = FineTuningJob.objects.get(pk=job_id)
            what = stage or "file validation"
            job_event_create(
                job=job,
                level="warn",
                message=f"The worker stopped responding during {what}; the stage was re-queued",
            )
            enqueue_stage(job_id=job_id, stage=stage or VALIDATING)
        swept.append(job_id)
    return swept


def job_sweep_unclaimed() -> list[str]:
    """Send again the stage of every job that has waited unclaimed longer than REQUEUE_AFTER.

    Its message may be lost: the broker refused it (the send is logged and skipped), or the
    process died between the commit and the send. A duplicate is harmless: claims are
    conditional, so a second delivery finds nothing to do. One sweeper wins per job (the
    conditional UPDATE of ``updated_at``), and a job is sent again at most once per period.
    A job sent MAX_REQUEUES times that no worker took fails with ``no_worker_available``
    rather than wait forever (no worker consumes its queue).
    """
    now = timezone.now()
    cutoff = now - timedelta(seconds=int(settings.CARRY_ON["REQUEUE_AFTER"]))
    limit = int(settings.CARRY_ON["MAX_REQUEUES"])
    waiting = FineTuningJob.objects.filter(
        status__in=[Status.VALIDATING_FILES, Status.QUEUED, Status.RUNNING],
        worker="",
        updated_at__lt=cutoff,
    ).values_list("pk", "status", "stage", "updated_at", "requeues")
    sent: list[str] = []
    for job_id, status, stage, updated_at, requeues in list(waiting):
        if status != Status.VALIDATING_FILES and not stage:
            continue
        stage = VALIDATING if status == Status.VALIDATING_FILES else stage
        with transaction.atomic():
            if not FineTuningJob.objects.filter(
                pk=job_id, worker="", status=status, updated_at=updated_at
            ).update(updated_at=now, requeues=F("requeues") + 1):
                continue
            if requeues >= limit:
                _fail_unclaimed(job_id, stage, requeues)
                continue
            enqueue_stage(job_id=job_id, stage=stage)
        sent.append(job_id)
    if sent:
        logger.warning("sent again the tasks of unclaimed jobs: %s", ", ".join(sent))
    return sent


QUEUE_OF_STAGE = {VALIDATING: "default", Stage.EXTRACTING: "embed", Stage.TRAINING: "train"}


def _fail_unclaimed(job_id: str, stage: str, sends: int) -> None:
    job = FineTuningJob.objects.get(pk=job_id)
    waited = int(settings.CARRY_ON["REQUEUE_AFTER"]) * (sends + 1)
    job_fail(
        job=job,
        worker="",
        code="no_worker_available",
        message=(
            f"No worker took the {stage} stage of this job in {waited} s ({sends + 1} sends); "
            f"no worker seems to consume the {QUEUE_OF_STAGE.get(stage, stage)!r} queue. "
            "Retry the job once one runs."
        ),
    )


# -- the plan: splits, configs, feature keys ------------------------------------------------------


@dataclass
class JobSplits:
    train: list[Any]  # customization.datasets.Example
    valid: list[Any]
    train_digest: str
    valid_digest: str


def job_splits(job: FineTuningJob) -> JobSplits:
    """The job's training and validation examples and the digests that key their features."""
    from customization.datasets import load_dataset, split_examples
    from customization.errors import DatasetFormatError

    if job.training_file is None:
        raise ApplicationError("the training file was deleted", param="training_file")
    train_file = job.training_file
    try:
        examples = load_dataset(file_read(file=train_file))
    except DatasetFormatError as exc:
        exc.param = "training_file"
        raise
    # Features are cached per owner: a cache hit on another user's upload of the same
    # bytes would tell this user that someone else has their data (events, timing).
    owner = feature_scope(job.owner_id)
    if job.validation_file is not None:
        try:
            valid = load_dataset(file_read(file=job.validation_file))
        except DatasetFormatError as exc:
            exc.param = "validation_file"
            raise
        return JobSplits(
            examples,
            valid,
            f"{train_file.sha256}:{owner}",
            f"{job.validation_file.sha256}:{owner}",
        )
    train, valid = split_examples(
        examples, valid_fraction=VALID_FRACTION, seed=SPLIT_SEED, max_valid=MAX_VALID_EXAMPLES
    )
    split = f"{VALID_FRACTION}:{MAX_VALID_EXAMPLES}:{SPLIT_SEED}"
    return JobSplits(
        train,
        valid,
        f"{train_file.sha256}:{owner}:train:{split}",
        f"{train_file.sha256}:{owner}:valid:{split}",
    )


def job_options_field(job: FineTuningJob) -> str:
    """The job field holding its adapter's options: ``carry_on`` or ``tail``."""
    return "tail" if job.kind == "tail" else "carry_on"


def job_tail_config(job: FineTuningJob) -> Any:
    from customization.config import TailConfig

    options = job.tail
    return TailConfig(
        depth=int(options["depth"]),
        rank=int(options["rank"]),
        alpha=float(options["alpha"]),
        target_modules=tuple(options["target_modules"]),
        dropout=float(options["dropout"]),
        num_layers=int(job.base.fingerprint["num_layers"]),
    )


def job_adapter_config(job: FineTuningJob) -> Any:
    """The job's CarryOnConfig or TailConfig."""
    return job_tail_config(job) if job.kind == "tail" else job_carry_on_config(job)


def job_carry_on_config(job: FineTuningJob) -> Any:
    from customization.config import CarryOnConfig

    options = job.carry_on
    return CarryOnConfig(
        d_model=options["d_model"],
        n_blocks=options["n_blocks"],
        n_heads=options["n_heads"],
        mlp_ratio=options["mlp_ratio"],
        taps=tuple(options["taps"]),
        tap_mode=options["tap_mode"],
        alpha=options["alpha"],
        dropout=options["dropout"],
    )


def job_feature_config(job: FineTuningJob) -> Any:
    from customization.config import FeatureConfig

    options = job_options(job)
    if job.kind == "tail":  # one state: the input of the tail's first layer
        taps, include_final = (job_tail_config(job).first_layer,), False
    else:
        taps, include_final = tuple(options["taps"]), True
    return FeatureConfig(
        taps=taps,
        max_length=int(options["max_length"]),
        storage_dtype=options["storage_dtype"],
        include_final=include_final,
    )


def job_training_config(job: FineTuningJob) -> Any:
    """The resolved TrainingConfig (after validation replaced every "auto")."""
    from customization.config import TrainingConfig
    from customization.presets import base_learning_rate

    hp, options = job.hyperparameters, job_options(job)
    return TrainingConfig(
        epochs=int(hp["n_epochs"]),
        batch_size=int(hp["batch_size"]),
        learning_rate=base_learning_rate(job.kind, job.preset)  # type: ignore[arg-type]
        * float(hp["learning_rate_multiplier"]),
        seed=int(job.seed),
        checkpoint_every=int(options["checkpoint_every"]),
        early_stopping_patience=int(options["early_stopping_patience"]),
    )


def job_tokenize(job: FineTuningJob, examples: list[Any], *, max_length: int) -> list[Any]:
    """Tokenize with the job's base; an over-long example is an error naming its line."""
    from customization.tokenizer import tokenize_examples

    return tokenize_examples(
        examples, base_tokenizer(job.base), max_length=max_length, overflow="error"
    )


def _resolve(job: FineTuningJob, splits: JobSplits) -> tuple[dict[str, Any], dict[str, Any]]:
    """Replace every "auto" by a number, from the data."""
    from customization.errors import DatasetFormatError

    options = dict(job_options(job))
    limit = min(
        int(settings.CARRY_ON["MAX_EXAMPLE_TOKENS"]), int(settings.CARRY_ON["MAX_LENGTH_CAP"])
    )
    max_length = limit if options["max_length"] == "auto" else int(options["max_length"])
    lengths = []
    for examples, param in ((splits.train, "training_file"), (splits.valid, "validation_file")):
        try:
            lengths += [
                len(t.input_ids) for t in job_tokenize(job, examples, max_length=max_length)
            ]
        except DatasetFormatError as exc:
            exc.param = param
            raise
    if options["max_length"] == "auto":
        options["max_length"] = max(8, max(lengths))
    hp = {
        key: AUTO_HYPERPARAMETERS[key] if value == "auto" else value
        for key, value in job.hyperparameters.items()
    }
    if job.hyperparameters.get("batch_size") == "auto":
        hp["batch_size"] = max(1, min(int(hp["batch_size"]), len(splits.train)))
    if options["checkpoint_every"] == "auto":
        total_steps = math.ceil(len(splits.train) / hp["batch_size"]) * hp["n_epochs"]
        options["checkpoint_every"] = max(1, math.ceil(total_steps / 5))
    return hp, options


def _feature_set(job: FineTuningJob, digest: str, config: Any) -> FeatureSet:
    from customization.features import feature_cache_key

    if not job.base.fingerprint_key:
        raise ApplicationError(
            f"base model {job.base.name!r} has no fingerprint; register it again",
            param="model",
            code="base_model_not_ready",
        )
    key = feature_cache_key(
        base_keys=[job.base.fingerprint_key], dataset_sha256=digest, config=config
    )
    feature_set, _ = FeatureSet.objects.get_or_create(
        key=key,
        defaults={"base": job.base, "dataset_sha256": digest, "config": config.to_dict()},
    )
    ready = feature_set.status == FeatureSet.Status.READY
    if ready and not (data_path(feature_set.path) / "manifest.json").is_file():
        feature_set.status = FeatureSet.Status.PENDING  # removed from disk: extract again
        feature_set.save(update_fields=["status", "updated_at"])
    return feature_set


def job_validate_files(*, job: FineTuningJob, worker: str) -> None:
    """Check the files against the job's base, resolve "auto" settings, queue the next stage.

    A job whose features are all cached goes straight to training (no embed worker needed).
    Raises CustomizationError / ApplicationError for bad data (the task fails the job).
    """
    splits = job_splits(job)
    hyperparameters, options = _resolve(job, splits)
    job.hyperparameters = hyperparameters
    setattr(job, job_options_field(job), options)
    config = job_feature_config(job)
    with transaction.atomic():
        train_fs = _feature_set(job, splits.train_digest, config)
        valid_fs = _feature_set(job, splits.valid_digest, config) if splits.valid else None
        cached = all(fs.status == FeatureSet.Status.READY for fs in (train_fs, valid_fs) if fs)
        stage = Stage.TRAINING if cached else Stage.EXTRACTING
        moved = job_transition(
            job=job,
            to=Status.QUEUED,
            only_worker=worker,
            stage=stage,
            worker="",
            heartbeat_at=None,
            attempts=0,
            hyperparameters=hyperparameters,
            train_features=train_fs,
            valid_features=valid_fs,
            **{job_options_field(job): options},
        )
        if not moved:
            return
        job_event_create(
            job=job,
            message=(
                f"Files validated: {len(splits.train)} training and {len(splits.valid)} "
                f"validation examples, up to {options['max_length']} tokens each"
            ),
        )
        if cached:
            job_event_create(
                job=job,
                message="Features of this dataset and base are cached; skipping extraction",
                data={"extraction_skipped": True},
            )
        enqueue_stage(job_id=job.id, stage=stage)


# -- extraction ------------------------------------------------------------------------------


def feature_set_ready(*, feature_set: FeatureSet, path: Path, manifest: dict[str, Any]) -> None:
    """Point the record at a completely written feature set (idempotent)."""
    feature_set.path = str(Path(path).resolve().relative_to(Path(settings.DATA_DIR).resolve()))
    feature_set.bytes = int(manifest.get("bytes", 0))
    feature_set.n_examples = int(manifest.get("n_examples", 0))
    feature_set.n_tokens = int(manifest.get("n_tokens", 0))
    feature_set.status = FeatureSet.Status.READY
    feature_set.save()


def job_extraction_done(*, job: FineTuningJob, worker: str) -> bool:
    """Hand the job from the embed queue to the train queue."""
    with transaction.atomic():
        moved = FineTuningJob.objects.filter(
            pk=job.pk, status=Status.RUNNING, stage=Stage.EXTRACTING, worker=worker
        ).update(
            stage=Stage.TRAINING,
            worker="",
            heartbeat_at=None,
            attempts=0,
            progress=EXTRACT_SHARE,
            updated_at=timezone.now(),
        )
        if not moved:
            return False
        job_event_create(job=job, message="Features extracted; queued for training")
        enqueue_stage(job_id=job.id, stage=Stage.TRAINING)
    return True


# -- training --------------------------------------------------------------------------------


def job_record_progress(
    *, job: FineTuningJob, worker: str, fraction: float, trained_tokens: int | None = None
) -> bool:
    """Progress of the running stage (0..1), mapped onto the job's bar; doubles as heartbeat."""
    if job.stage == Stage.EXTRACTING:
        overall = EXTRACT_SHARE * fraction
    else:
        overall = EXTRACT_SHARE + (1 - EXTRACT_SHARE) * fraction
    values: dict[str, Any] = {"progress": min(1.0, overall), "heartbeat_at": timezone.now()}
    if trained_tokens is not None:
        values["trained_tokens"] = trained_tokens
    return bool(
        FineTuningJob.objects.filter(pk=job.pk, worker=worker, status=Status.RUNNING).update(
            **values
        )
    )


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None.

    JSON has no NaN: PostgreSQL refuses the whole row, and a reader (the loss curve)
    would have to guard every number. A diverged run is reported by its error instead.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(item) for item in value]
    return value


def job_record_metrics(*, job: FineTuningJob, data: dict[str, Any], message: str) -> None:
    job_event_create(job=job, type="metrics", message=message, data=finite_json(data))


def job_parent_artifact(job: FineTuningJob) -> tuple[Path, str] | None:
    """Where a continued fine-tune's parent artifact is and its recorded sha256; None for a
    job that starts from scratch. A parent deleted since the job was created fails it."""
    if not job.parent_model:
        return None
    parent = Adapter.objects.filter(pk=job.parent_id).first() if job.parent_id else None
    if parent is None:
        raise ApplicationError(
            f"the model this job continues, {job.parent_model}, was deleted before training "
            "started",
            param="model",
            code="parent_model_deleted",
        )
    return data_path(parent.path), parent.sha256


def job_training_resumed(*, job: FineTuningJob, step: int, worker: str = "") -> None:
    """Forget metrics of steps after the checkpoint: the resumed run replays them."""
    job.events.filter(type="metrics", data__step__gt=step).delete()
    job.checkpoints.filter(step__gt=step).delete()
    job_event_create(
        job=job,
        message=f"Resuming training from the checkpoint at step {step}",
        data={"worker": worker, "resumed_at_step": step},
    )


def checkpoint_record(
    *,
    job: FineTuningJob,
    step: int,
    path: Path,
    sha256: str,
    nbytes: int,
    metrics: dict[str, Any],
) -> Checkpoint:
    """Record a completely written checkpoint (idempotent per step)."""
    relative = str(Path(path).resolve().relative_to(Path(settings.DATA_DIR).resolve()))
    checkpoint, _ = Checkpoint.objects.update_or_create(
        job=job,
        step=step,
        defaults={
            "path": relative,
            "sha256": sha256,
            "bytes": nbytes,
            "metrics": finite_json(metrics),
        },
    )
    _prune_checkpoints(job)
    return checkpoint


def _prune_checkpoints(job: FineTuningJob) -> None:
    """Keep the newest KEEP_CHECKPOINTS checkpoints (0: all); delete the rest, files too.

    More than one is kept: a newest checkpoint found damaged on resume is skipped for the
    one before it.
    """
    keep = int(settings.CARRY_ON["KEEP_CHECKPOINTS"])
    if keep <= 0:
        return
    old = list(job.checkpoints.order_by("-step")[keep:])
    for checkpoint in old:
        checkpoint.delete()
        remove_artifact(checkpoint.path)


def job_succeed(
    *,
    job: FineTuningJob,
    worker: str,
    path: Path,
    sha256: str,
    nbytes: int,
    n_parameters: int,
    metrics: dict[str, Any],
    trained_tokens: int,
) -> Adapter | None:
    """Register the adapter and finish the job; None if the job was cancelled meanwhile."""
    relative = str(Path(path).resolve().relative_to(Path(settings.DATA_DIR).resolve()))
    with transaction.atomic():
        moved = job_transition(
            job=job,
            to=Status.SUCCEEDED,
            only_worker=worker,
            progress=1.0,
            trained_tokens=trained_tokens,
        )
        if not moved:
            return None
        # Read now, not from the claim: the parent may have been deleted while this trained.
        parent = Adapter.objects.filter(pk=job.parent_id).first() if job.parent_id else None
        adapter = Adapter.objects.create(
            name=job_model_name(job),
            owner=job.owner,
            base=job.base,
            job=job,
            path=relative,
            sha256=sha256,
            bytes=nbytes,
            n_parameters=n_parameters,
            metrics=finite_json(metrics),
            kind=job.kind,
            preset=job.preset,
            depth=int(job.tail["depth"]) if job.kind == "tail" else None,
            parent=parent,
        )
        job_event_create(job=job, message=f"New fine-tuned model created: {adapter.name}")
        job_event_create(job=job, message="The job has successfully completed")
    return adapter


def job_fail(
    *,
    job: FineTuningJob,
    code: str,
    message: str,
    param: str | None = None,
    worker: str | None = None,
) -> bool:
    """Fail a job with a clear error; False if it already finished (e.g. was cancelled)."""
    job.refresh_from_db(fields=["status", "worker"])
    if job.is_terminal:
        return False
    error = {"code": code, "message": message, "param": param}
    with transaction.atomic():
        if not job_transition(job=job, to=Status.FAILED, only_worker=worker, error=error):
            return False
        job_event_create(job=job, level="error", message=message, data={"error": error})
    return True
