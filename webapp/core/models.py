"""Shared model bases and fields."""

from __future__ import annotations

from typing import Any, ClassVar

from django.db import models
from django.utils import timezone

from webapp.core.utils import PublicId


class TimeStampedModel(models.Model):
    """``created_at`` and ``updated_at`` for every record."""

    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        abstract = True


class ClaimedModel(TimeStampedModel):
    """Work a worker claims and runs (a fine-tuning job, an evaluation): its claim and times.

    Subclasses set ``TERMINAL``, the statuses after which nothing runs again.
    """

    # The claim: which task execution holds it, and when it last said so.
    worker = models.CharField(max_length=255, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    attempts = models.IntegerField(default=0)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    status: str  # a field of the subclass
    TERMINAL: ClassVar[frozenset[str]] = frozenset()

    class Meta:
        abstract = True

    def __str__(self) -> str:
        return str(self.pk)

    @property
    def is_terminal(self) -> bool:
        return self.status in self.TERMINAL


def status_update(
    record: ClaimedModel, to: str, *, only_worker: str | None = None, **fields: Any
) -> bool:
    """Move ``record`` to status ``to`` (with ``fields``) in one conditional UPDATE, if it is
    still in the status it was read with (and, with ``only_worker``, held by that worker).

    False when it moved on meanwhile: the update loses cleanly to a concurrent one. A
    terminal status also stamps ``finished_at`` and releases the claim.
    """
    now = timezone.now()
    values: dict[str, Any] = {"status": to, "updated_at": now, **fields}
    if to in record.TERMINAL:
        values.setdefault("finished_at", now)
        values.setdefault("worker", "")
    rows = type(record)._default_manager.filter(pk=record.pk, status=record.status)
    if only_worker is not None:
        rows = rows.filter(worker=only_worker)
    if not rows.update(**values):
        return False
    for name, value in values.items():
        setattr(record, name, value)
    return True


def public_id_field(prefix: str, **kwargs: Any) -> models.CharField:
    """The OpenAI-style primary key: ``<prefix>-<24 random characters>``."""
    return models.CharField(
        primary_key=True,
        max_length=len(prefix) + 1 + 24,
        default=PublicId(prefix),
        editable=False,
        **kwargs,
    )
