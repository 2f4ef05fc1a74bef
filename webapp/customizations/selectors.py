"""Reads of customization records, always filtered by the requesting user.

Another user's id is indistinguishable from a missing one: both raise ``NotFoundError``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from django.db.models import QuerySet

from webapp.accounts.models import User
from webapp.core.exceptions import NotFoundError
from webapp.customizations.models import (
    Adapter,
    BaseModel,
    Checkpoint,
    File,
    FineTuningJob,
    JobEvent,
)
from webapp.customizations.services.jobs import job_model_name


def base_model_list(*, enabled_only: bool = True) -> QuerySet[BaseModel]:
    rows = BaseModel.objects.all()
    return rows.filter(enabled=True) if enabled_only else rows


def base_model_default() -> BaseModel | None:
    return BaseModel.objects.filter(is_default=True, enabled=True).first()


def file_list(*, user: User) -> QuerySet[File]:
    return File.objects.filter(owner=user).order_by("-created_at")


def file_get(*, user: User, file_id: str) -> File:
    file = file_list(user=user).filter(pk=file_id).first()
    if file is None:
        raise NotFoundError(f"No such File object: {file_id}", param="id")
    return file


def job_list(*, user: User, filters: dict[str, Any] | None = None) -> QuerySet[FineTuningJob]:
    rows = FineTuningJob.objects.filter(owner=user).select_related("base", "adapter")
    if filters:
        rows = rows.filter(**filters)
    return rows.order_by("-created_at")


def job_get(*, user: User, job_id: str) -> FineTuningJob:
    job = job_list(user=user).filter(pk=job_id).first()
    if job is None:
        raise NotFoundError(f"Job with id {job_id} not found", param="fine_tuning_job_id")
    return job


def job_event_list(*, user: User, job_id: str) -> QuerySet[JobEvent]:
    return job_get(user=user, job_id=job_id).events.order_by("seq")


def job_event_get(*, user: User, event_id: str) -> JobEvent:
    event = JobEvent.objects.filter(pk=event_id, job__owner=user).first()
    if event is None:
        raise NotFoundError(f"No such event: {event_id}", param="id")
    return event


def job_loss_curve(*, job: FineTuningJob) -> list[dict[str, Any]]:
    """(step, train_loss[, valid_loss]) points from the job's metrics events, by step."""
    points: dict[int, dict[str, Any]] = {}
    for data in job.events.filter(type=JobEvent.Type.METRICS).values_list("data", flat=True):
        if not isinstance(data, dict) or "step" not in data:
            continue
        point = points.setdefault(int(data["step"]), {"step": int(data["step"])})
        for key in ("train_loss", "valid_loss"):
            if data.get(key) is not None:
                point[key] = float(data[key])
    return [points[step] for step in sorted(points)]


def checkpoint_list(*, user: User, job_id: str) -> QuerySet[Checkpoint]:
    return job_get(user=user, job_id=job_id).checkpoints.order_by("-step")


def checkpoint_get(*, user: User, checkpoint_id: str) -> Checkpoint:
    checkpoint = Checkpoint.objects.filter(pk=checkpoint_id, job__owner=user).first()
    if checkpoint is None:
        raise NotFoundError(f"No such checkpoint: {checkpoint_id}", param="id")
    return checkpoint


def adapter_list(*, user: User, active_only: bool = False) -> QuerySet[Adapter]:
    rows = Adapter.objects.filter(owner=user).select_related("base", "job")
    if active_only:
        rows = rows.filter(active=True)
    return rows.order_by("-created_at")


def adapter_get(*, user: User, name: str) -> Adapter:
    adapter = adapter_list(user=user).filter(name=name).first()
    if adapter is None:
        raise NotFoundError(f"The model '{name}' does not exist", param="model")
    return adapter


@dataclass(frozen=True)
class ServableModel:
    """What a ``model`` name in a request resolves to: a base, plus a carry-on artifact."""

    name: str
    base: BaseModel
    adapter_id: str | None = None  # the cache identity of the carry-on
    path: str | None = None  # relative to DATA_DIR
    sha256: str | None = None


_CHECKPOINT_SUFFIX = re.compile(r"^(?P<model>.+):ckpt-step-(?P<step>\d+)$")


def model_resolve(*, user: User, name: str) -> ServableModel:
    """A base, one of the caller's active adapters, or one of their checkpoints by name.

    Another user's adapter, a deactivated one and a missing one all read as "does not
    exist": the permission check happens here, before a request joins a batch.
    """
    base = base_model_list().filter(name=name).first()
    if base is not None:
        return ServableModel(name=name, base=base)
    adapter = adapter_list(user=user, active_only=True).filter(name=name).first()
    if adapter is not None and adapter.base.enabled:
        return ServableModel(
            name=name, base=adapter.base, adapter_id=adapter.name, path=adapter.path,
            sha256=adapter.sha256,
        )  # fmt: skip
    match = _CHECKPOINT_SUFFIX.match(name)
    if match is not None:
        job_id = match["model"].rsplit(":", 1)[-1]
        checkpoint = (
            Checkpoint.objects.filter(job__owner=user, job_id=job_id, step=int(match["step"]))
            .select_related("job__base")
            .first()
        )
        if (
            checkpoint is not None
            and checkpoint.job.base.enabled
            and job_model_name(checkpoint.job) == match["model"]
        ):
            return ServableModel(
                name=name, base=checkpoint.job.base, adapter_id=checkpoint.pk,
                path=checkpoint.path, sha256=checkpoint.sha256,
            )  # fmt: skip
    raise NotFoundError(
        f"The model '{name}' does not exist or you do not have access to it.", param="model"
    )
