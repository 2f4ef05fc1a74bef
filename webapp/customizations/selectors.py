"""Reads of customization records, always filtered by the requesting user.

Another user's id is indistinguishable from a missing one: both raise ``NotFoundError``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from django.core.cache import cache
from django.db.models import Q, QuerySet
from django.utils import timezone

from webapp.accounts.models import User
from webapp.core.exceptions import ApplicationError, NotFoundError
from webapp.core.utils import data_path, first_or_not_found
from webapp.customizations.models import (
    Adapter,
    BaseModel,
    Checkpoint,
    File,
    FineTuningJob,
    JobEvent,
)


def base_model_list(*, enabled_only: bool = True) -> QuerySet[BaseModel]:
    rows = BaseModel.objects.all()
    return rows.filter(enabled=True) if enabled_only else rows


def base_model_default() -> BaseModel | None:
    return BaseModel.objects.filter(is_default=True, enabled=True).first()


def file_list(*, user: User) -> QuerySet[File]:
    return File.objects.filter(owner=user).order_by("-created_at")


def file_get(*, user: User, file_id: str) -> File:
    return first_or_not_found(
        file_list(user=user).filter(pk=file_id), f"No such File object: {file_id}", param="id"
    )


def job_list(*, user: User, filters: dict[str, Any] | None = None) -> QuerySet[FineTuningJob]:
    rows = FineTuningJob.objects.filter(owner=user).select_related("base", "adapter")
    if filters:
        rows = rows.filter(**filters)
    return rows.order_by("-created_at")


def job_get(*, user: User, job_id: str) -> FineTuningJob:
    return first_or_not_found(
        job_list(user=user).filter(pk=job_id),
        f"Job with id {job_id} not found",
        param="fine_tuning_job_id",
    )


def job_event_list(*, user: User, job_id: str) -> QuerySet[JobEvent]:
    return job_get(user=user, job_id=job_id).events.order_by("seq")


def job_event_get(*, user: User, event_id: str) -> JobEvent:
    return first_or_not_found(
        JobEvent.objects.filter(pk=event_id, job__owner=user),
        f"No such event: {event_id}",
        param="id",
    )


@dataclass(frozen=True)
class LossCurve:
    """Loss points by step, and the run's planned number of steps when it is known."""

    points: list[dict[str, Any]]
    total_steps: int | None = None


def job_curve(*, job: FineTuningJob) -> LossCurve:
    """(step, train_loss[, valid_loss]) points from the job's metrics events, by step."""
    points: dict[int, dict[str, Any]] = {}
    total_steps = _add_points(points, job.events.filter(type=JobEvent.Type.METRICS), None)[0]
    return LossCurve([points[step] for step in sorted(points)], total_steps)


def _add_points(
    points: dict[int, dict[str, Any]], events: QuerySet[JobEvent], total_steps: int | None
) -> tuple[int | None, int]:
    """Merge metrics events into ``points`` (by step); the total steps and the last seq."""
    last_seq = 0
    for seq, data in events.values_list("seq", "data"):
        last_seq = max(last_seq, seq)
        if not isinstance(data, dict) or "step" not in data:
            continue
        point = points.setdefault(int(data["step"]), {"step": int(data["step"])})
        for key in ("train_loss", "valid_loss"):
            if isinstance(data.get(key), int | float):
                point[key] = float(data[key])
        if isinstance(data.get("total_steps"), int):
            total_steps = max(total_steps or 0, data["total_steps"])
    return total_steps, last_seq


# Events of one job come from one worker at a time and the web process (cancel), with
# seq taken from each one's clock: a read "after seq" looks this far back, so an event
# committed a little out of order is still found (readers merge by seq or by step).
SEQ_OVERLAP_NS = 30 * 10**9


def job_curve_live(*, job: FineTuningJob) -> LossCurve:
    """``job_curve``, reading only the metrics events added since the last call.

    The points so far are cached per job (in the shared cache where there is one) and
    keyed by ``updated_at``, which a claim or a transition changes: a resumed run, whose
    replayed steps replace the ones after its checkpoint, starts from a full read.
    """
    key = f"carry-on:curve:{job.pk}:{job.updated_at.timestamp()}"
    cached = cache.get(key)
    points: dict[int, dict[str, Any]] = {}
    total_steps, after = None, None
    if cached is not None:
        points, total_steps, after = cached
    events = job.events.filter(type=JobEvent.Type.METRICS)
    if after is not None:
        events = events.filter(seq__gt=after - SEQ_OVERLAP_NS)
    total_steps, last_seq = _add_points(points, events, total_steps)
    cache.set(key, (points, total_steps, max(last_seq, after or 0)), timeout=3600)
    return LossCurve([points[step] for step in sorted(points)], total_steps)


def job_loss_curve(*, job: FineTuningJob) -> list[dict[str, Any]]:
    return job_curve(job=job).points


def checkpoint_list(*, user: User, job_id: str) -> QuerySet[Checkpoint]:
    return job_get(user=user, job_id=job_id).checkpoints.order_by("-step")


def checkpoint_get(*, user: User, checkpoint_id: str) -> Checkpoint:
    return first_or_not_found(
        Checkpoint.objects.filter(pk=checkpoint_id, job__owner=user),
        f"No such checkpoint: {checkpoint_id}",
        param="id",
    )


def adapter_list(*, user: User, active_only: bool = False) -> QuerySet[Adapter]:
    rows = Adapter.objects.filter(owner=user).select_related("base", "job")
    if active_only:
        rows = rows.filter(active=True)
    return rows.order_by("-created_at")


def adapter_get(*, user: User, name: str) -> Adapter:
    return first_or_not_found(
        adapter_list(user=user).filter(name=name),
        f"The model '{name}' does not exist",
        param="model",
    )


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
            and checkpoint.job.model_name == match["model"]
        ):
            return ServableModel(
                name=name, base=checkpoint.job.base, adapter_id=checkpoint.pk,
                path=checkpoint.path, sha256=checkpoint.sha256,
            )  # fmt: skip
    raise NotFoundError(
        f"The model '{name}' does not exist or you do not have access to it.", param="model"
    )


def adapter_get_by_id(*, user: User, adapter_id: int) -> Adapter:
    return first_or_not_found(
        adapter_list(user=user).filter(pk=adapter_id),
        f"No adapter with id {adapter_id}",
        param="id",
    )


# -- what the browser pages show ------------------------------------------------------------

RECENT = 5
EVENTS_SHOWN = 200
PREVIEW_EXAMPLES = 3
PREVIEW_LINES = 50
PREVIEW_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Dashboard:
    n_files: int
    files: list[File]
    running_jobs: list[FineTuningJob]
    recent_jobs: list[FineTuningJob]
    n_jobs: int
    n_adapters: int
    adapters: list[Adapter]


def dashboard_get(*, user: User) -> Dashboard:
    """The user's records at a glance: newest datasets, live and recent jobs, adapters."""
    jobs = job_list(user=user)
    live = jobs.exclude(status__in=FineTuningJob.TERMINAL)
    adapters = adapter_list(user=user)
    return Dashboard(
        n_files=file_list(user=user).count(),
        files=list(file_list(user=user)[:RECENT]),
        running_jobs=list(live[:20]),
        recent_jobs=list(jobs.filter(status__in=FineTuningJob.TERMINAL)[:RECENT]),
        n_jobs=jobs.count(),
        n_adapters=adapters.count(),
        adapters=list(adapters[:RECENT]),
    )


@dataclass(frozen=True)
class JobPage:
    """Everything the job page shows, all read from the database (a reload shows the same)."""

    job: FineTuningJob
    curve: LossCurve
    events: list[JobEvent]
    checkpoints: list[Checkpoint]
    elapsed_seconds: float | None
    eta_seconds: float | None


def job_page_get(*, user: User, job_id: str, after_seq: int | None = None) -> JobPage:
    """The job page; with ``after_seq`` (what the page already shows) only newer events.

    The live page polls every few seconds: it reads the events added since its last poll
    (with SEQ_OVERLAP_NS of margin), and the curve from the cached points plus new ones.
    """
    job = job_get(user=user, job_id=job_id)
    # The log: messages and per-epoch summaries; per-step metrics are drawn, not listed.
    events = job.events.filter(Q(type=JobEvent.Type.MESSAGE) | Q(data__has_key="epoch_train_loss"))
    if after_seq is not None:
        events = events.filter(seq__gt=after_seq - SEQ_OVERLAP_NS)
    events = events.order_by("-seq")[:EVENTS_SHOWN]
    elapsed = eta = None
    if job.started_at is not None:
        end = job.finished_at or timezone.now()
        elapsed = max(0.0, (end - job.started_at).total_seconds())
        # Progress over elapsed time; only once there is enough progress to extrapolate.
        if job.status == FineTuningJob.Status.RUNNING and job.progress >= 0.02:
            eta = elapsed * (1 - job.progress) / job.progress
    return JobPage(
        job=job,
        curve=job_curve_live(job=job),
        events=list(events),
        checkpoints=list(job.checkpoints.order_by("step")),
        elapsed_seconds=elapsed,
        eta_seconds=eta,
    )


def file_preview(*, file: File, limit: int = PREVIEW_EXAMPLES) -> list[dict[str, Any]]:
    """The first valid examples as the default base's chat template renders them for training.

    Each item: ``line``, ``messages`` and ``rendered`` (None when no base is registered).
    """
    from customization.datasets import parse_dataset

    try:
        head = _file_head(file_open(file=file))
        base = base_model_default()
        tokenizer = base_tokenizer(base) if base is not None else None
    except ApplicationError:
        return []
    parsed = parse_dataset(head)
    preview = []
    for example in parsed.examples[:limit]:
        rendered = None
        if tokenizer is not None:
            rendered = tokenizer.render(example.messages, add_generation_prompt=False)
        preview.append({"line": example.line, "messages": example.messages, "rendered": rendered})
    return preview


def _file_head(handle: BinaryIO) -> bytes:
    """The first PREVIEW_LINES whole lines (at most PREVIEW_BYTES): the preview must not
    read, let alone parse, a large upload on every view."""
    lines = []
    with handle:
        budget = PREVIEW_BYTES
        for _ in range(PREVIEW_LINES):
            line = handle.readline(budget + 1)
            if not line or len(line) > budget:  # the end, or a line past the budget
                break
            lines.append(line)
            budget -= len(line)
            if not line.endswith(b"\n"):
                break
    return b"".join(lines)


@dataclass(frozen=True)
class PlaygroundCheckpoint:
    """A checkpoint as the playground offers it: the model name the API serves it by."""

    name: str
    label: str
    base_name: str


@dataclass(frozen=True)
class PlaygroundModels:
    bases: list[BaseModel]
    adapters: list[Adapter]
    checkpoints: list[PlaygroundCheckpoint]


PLAYGROUND_CHECKPOINTS = 50


def playground_models(*, user: User) -> PlaygroundModels:
    """What the user may chat with: enabled bases, their own active adapters, and the
    checkpoints of their jobs (newest first; ``model_resolve`` serves each by its name)."""
    adapters = adapter_list(user=user, active_only=True).filter(base__enabled=True)
    rows = (
        Checkpoint.objects.filter(job__owner=user, job__base__enabled=True)
        .select_related("job__base", "job__owner", "job__adapter")
        .order_by("-created_at", "-step")[:PLAYGROUND_CHECKPOINTS]
    )
    checkpoints = []
    for checkpoint in rows:
        job = checkpoint.job
        adapter = getattr(job, "adapter", None)
        owner = adapter.display_name if adapter is not None else job.suffix or job.id
        checkpoints.append(
            PlaygroundCheckpoint(
                name=checkpoint.model_name,
                label=f"{owner} · step {checkpoint.step}",
                base_name=job.base.name,
            )
        )
    return PlaygroundModels(
        bases=list(base_model_list()), adapters=list(adapters), checkpoints=checkpoints
    )


# -- stored content ------------------------------------------------------------------------


def file_open(*, file: File) -> BinaryIO:
    """The stored content, open for reading: for streaming it or reading its head."""
    try:
        return data_path(file.path).open("rb")
    except (FileNotFoundError, ValueError):
        raise _missing(file) from None


def _missing(file: File) -> ApplicationError:
    return ApplicationError(
        f"the content of {file.id} is missing from storage",
        code="file_missing",
        status=500,
        type="server_error",
    )


def file_read(*, file: File) -> bytes:
    """The stored content, whole."""
    try:
        return data_path(file.path).read_bytes()
    except (FileNotFoundError, ValueError):
        raise _missing(file) from None


def base_tokenizer(base: BaseModel) -> Any:
    """The base's ChatTokenizer (torch-free), cached per process until its files change."""
    tokenizer_file = Path(base.path) / "tokenizer.json"
    try:
        stamp = tokenizer_file.stat().st_mtime_ns
    except FileNotFoundError:
        raise ApplicationError(
            f"the files of base model {base.name!r} are missing at {base.path}",
            param="model",
            code="base_model_not_found",
            status=500,
            type="server_error",
        ) from None
    return _load_tokenizer(str(base.path), stamp)


@functools.lru_cache(maxsize=8)
def _load_tokenizer(path: str, _stamp: int) -> Any:
    from customization.tokenizer import ChatTokenizer

    return ChatTokenizer.from_dir(path)
