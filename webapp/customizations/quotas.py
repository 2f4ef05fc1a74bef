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
from webapp.core.models import ClaimedModel
from webapp.customizations.models import Adapter, Checkpoint, File, FineTuningJob


class QuotaExceededError(ApplicationError):
    """403, not 429: retrying does not help until the user frees something."""

    status = 403


def _lock(user: User) -> None:
    User.objects.select_for_update().filter(pk=user.pk).first()


def quota_check_active(
    *, user: User, model: type[ClaimedModel], setting: str, what: str, code: str
) -> None:
    """Refuse one more ``model`` row while the user has ``settings.CARRY_ON[setting]``
    unfinished ones (``what`` names them in the message)."""
    limit = int(settings.CARRY_ON[setting])
    _lock(user)
    active = model._default_manager.filter(owner=user).exclude(status__in=model.TERMINAL)
    if active.count() >= limit:
        raise QuotaExceededError(
            f"You have {limit} {what}, the most allowed (CARRY_ON_{setting}). "
            "Wait for one to finish or cancel one.",
            code=code,
        )


def quota_check_active_jobs(*, user: User) -> None:
    """Refuse one more job while the user has MAX_ACTIVE_JOBS_PER_USER unfinished ones."""
    quota_check_active(
        user=user,
        model=FineTuningJob,
        setting="MAX_ACTIVE_JOBS_PER_USER",
        what="jobs validating, queued or running",
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
