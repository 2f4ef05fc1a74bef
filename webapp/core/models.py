"""Shared model bases and fields."""

from __future__ import annotations

from typing import Any

from django.db import models

from webapp.core.utils import PublicId


class TimeStampedModel(models.Model):
    """``created_at`` and ``updated_at`` for every record."""

    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        abstract = True


def public_id_field(prefix: str, **kwargs: Any) -> models.CharField:
    """The OpenAI-style primary key: ``<prefix>-<24 random characters>``."""
    return models.CharField(
        primary_key=True,
        max_length=len(prefix) + 1 + 24,
        default=PublicId(prefix),
        editable=False,
        **kwargs,
    )
