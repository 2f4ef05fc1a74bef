"""What a job's running stages record: progress, metrics, checkpoints, the adapter, failure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from webapp.core.utils import finite_json, relative_data_path
from webapp.customizations.artifacts import remove_artifact
from webapp.customizations.models import Adapter, Checkpoint, FeatureSet, FineTuningJob
from webapp.customizations.services.jobs import enqueue_stage, job_event_create, job_transition

Status = FineTuningJob.Status
Stage = FineTuningJob.Stage
# Share of the progress bar given to extraction; training fills the rest.
EXTRACT_SHARE = 0.2


# -- extraction ------------------------------------------------------------------------------


def feature_set_ready(*, feature_set: FeatureSet, path: Path, manifest: dict[str, Any]) -> None:
    """Point the record at a completely written feature set (idempotent)."""
    feature_set.path = relative_data_path(path)
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


def job_record_metrics(*, job: FineTuningJob, data: dict[str, Any], message: str) -> None:
    job_event_create(job=job, type="metrics", message=message, data=finite_json(data))


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
    relative = relative_data_path(path)
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
    relative = relative_data_path(path)
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
            name=job.model_name,
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
