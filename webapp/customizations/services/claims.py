"""Claims on a job's stage: take, release, heartbeat, and the sweeps of stalled or lost stages.

A task claims its job with one conditional UPDATE (free, already its own, or its holder's
heartbeat is stale), so two workers never run the same stage of a job at once; a heartbeat
that finds the claim gone (cancelled, or taken over after a stall) tells the task to stop.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Case, F, Q, Value, When
from django.db.models.functions import Coalesce
from django.utils import timezone

from webapp.customizations.models import FineTuningJob
from webapp.customizations.services.jobs import enqueue_stage, job_event_create
from webapp.customizations.services.results import job_fail

logger = logging.getLogger(__name__)
Status = FineTuningJob.Status
Stage = FineTuningJob.Stage
VALIDATING = "validating"


def _timeout() -> timedelta:
    return timedelta(seconds=int(settings.CARRY_ON["HEARTBEAT_TIMEOUT"]))


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
