"""Per-user quotas on what a user keeps: active jobs and stored bytes (settings.CARRY_ON).

Each check locks the user's row first (``select_for_update``), so two requests of one user
that race each other are counted one after the other and neither slips past the quota. Call
them inside the transaction that creates the record.
"""

from __future__ import annotations

from django.conf import settings
from django.db.models import Sum

from webapp.accounts.models import User
from webapp.core.exceptions import ApplicationError
from webapp.customizations.models import Adapter, Checkpoint, File, FineTuningJob


class QuotaExceededError(ApplicationError):
    """403, not 429: retrying does not help until the user frees something."""

    status = 403


def _lock(user: User) -> None:
    User.objects.select_for_update().filter(pk=user.pk).first()


def quota_check_active_jobs(*, user: User) -> None:
    """Refuse one more job while the user has MAX_ACTIVE_JOBS_PER_USER unfinished ones."""
    limit = int(settings.CARRY_ON["MAX_ACTIVE_JOBS_PER_USER"])
    _lock(user)
    active = FineTuningJob.objects.filter(owner=user).exclude(status__in=FineTuningJob.TERMINAL)
    if active.count() >= limit:
        raise QuotaExceededError(
            f"You have {limit} jobs validating, queued or running, the most allowed "
            "(CARRY_ON_MAX_ACTIVE_JOBS_PER_USER). Wait for one to finish or cancel one.",
            code="active_jobs_quota_exceeded",
        )


def stored_bytes(*, user: User) -> int:
    """Bytes the user's uploads, adapters and checkpoints take on storage."""
    files = File.objects.filter(owner=user).aggregate(n=Sum("bytes"))["n"] or 0
    adapters = Adapter.objects.filter(owner=user).aggregate(n=Sum("bytes"))["n"] or 0
    checkpoints = Checkpoint.objects.filter(job__owner=user).aggregate(n=Sum("bytes"))["n"] or 0
    return int(files + adapters + checkpoints)


def quota_check_storage(*, user: User, adding: int) -> None:
    """Refuse ``adding`` more bytes past MAX_STORED_BYTES_PER_USER."""
    limit = int(settings.CARRY_ON["MAX_STORED_BYTES_PER_USER"])
    _lock(user)
    used = stored_bytes(user=user)
    if used + adding > limit:
        raise QuotaExceededError(
            f"This upload ({adding} bytes) would take your storage to {used + adding} bytes; "
            f"the quota is {limit} bytes (CARRY_ON_MAX_STORED_BYTES_PER_USER). Delete files "
            "or adapters you no longer need.",
            param="file",
            code="storage_quota_exceeded",
        )
