"""Garbage collection of artifacts no record points at (crashes, deletes, old temp files)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

from django.conf import settings

from webapp.customizations.artifacts import (
    AREAS,
    CHECKPOINTS,
    remove_artifact,
    upload_tokens_path,
)
from webapp.customizations.models import Adapter, Checkpoint, FeatureSet, File, FineTuningJob


def _referenced() -> set[str]:
    paths: set[str] = set()
    for model in (File, FeatureSet, Adapter, Checkpoint):
        paths.update(p for p in model.objects.exclude(path="").values_list("path", flat=True))
    uploads = File.objects.exclude(path="").values_list("path", flat=True)
    paths.update(upload_tokens_path(p) for p in uploads)  # a sidecar lives with its upload
    return paths


def _candidates(root: Path) -> Iterable[Path]:
    """Top-level entries of each area, plus checkpoint folders inside each job."""
    for area in AREAS:
        folder = root / area
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if area == "jobs" and entry.is_dir() and not entry.name.startswith("."):
                yield entry
                checkpoints = entry / CHECKPOINTS
                if checkpoints.is_dir():
                    yield from checkpoints.iterdir()
            else:
                yield entry


def artifacts_collect_garbage(*, dry_run: bool = False, grace_seconds: int = 3600) -> list[str]:
    """Remove artifacts that no record references and that are older than the grace period.

    The grace period protects artifacts being written right now (their row comes after).
    Returns the relative paths removed (or that would be, with ``dry_run``).
    """
    root = Path(settings.DATA_DIR).resolve()
    referenced = _referenced()
    jobs = set(FineTuningJob.objects.values_list("pk", flat=True))
    active_jobs = set(
        FineTuningJob.objects.exclude(status__in=FineTuningJob.TERMINAL).values_list(
            "pk", flat=True
        )
    )
    cutoff = time.time() - grace_seconds
    removed: list[str] = []
    for path in _candidates(root):
        relative = str(path.relative_to(root))
        parts = relative.split("/")
        if relative in referenced or _has_referenced_child(relative, referenced):
            continue
        if parts[0] == "jobs":
            job_id = parts[1]
            if job_id in active_jobs:
                continue  # checkpoints of a running job are recorded as they complete
            if len(parts) == 2 and job_id in jobs:
                continue  # the job folder itself stays while its job exists
        try:
            if path.lstat().st_mtime > cutoff:
                continue
        except FileNotFoundError:
            continue
        removed.append(relative)
        if not dry_run:
            remove_artifact(relative)
    return removed


def _has_referenced_child(relative: str, referenced: set[str]) -> bool:
    prefix = relative + "/"
    return any(path.startswith(prefix) for path in referenced)
