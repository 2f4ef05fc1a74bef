"""Registering base models, and the torch-free tokenizer the web process validates with."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from django.db import transaction

from webapp.core.exceptions import ApplicationError
from webapp.customizations.models import BaseModel

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@transaction.atomic
def base_model_register(
    *,
    name: str,
    source: str,
    source_type: str,
    path: str | Path,
    fingerprint: dict[str, Any],
    revision: str = "",
    enabled: bool = True,
    default: bool = False,
) -> BaseModel:
    """Create or update a base; ``fingerprint`` comes from the loaded model (see workers)."""
    if not _NAME.match(name) or ":" in name:
        raise ApplicationError(
            f"base model name {name!r} must be 1-128 letters, digits, '.', '_' or '-'",
            param="name",
        )
    if source_type not in BaseModel.SourceType.values:
        raise ApplicationError(f"unknown source type {source_type!r}", param="source_type")
    if not (Path(path) / "tokenizer.json").is_file():
        raise ApplicationError(f"{path} is not a prepared HF folder (no tokenizer.json)")
    base, _ = BaseModel.objects.update_or_create(
        name=name,
        defaults={
            "source": str(source),
            "source_type": source_type,
            "path": str(path),
            "revision": revision,
            "fingerprint": fingerprint,
            "fingerprint_key": str(fingerprint.get("key", "")),
            "enabled": enabled,
        },
    )
    if default or not BaseModel.objects.filter(is_default=True).exists():
        base_model_set_default(base=base)
    return base


@transaction.atomic
def base_model_set_default(*, base: BaseModel) -> BaseModel:
    BaseModel.objects.filter(is_default=True).exclude(pk=base.pk).update(is_default=False)
    base.is_default = True
    base.enabled = True
    base.save(update_fields=["is_default", "enabled", "updated_at"])
    return base


def base_model_set_enabled(*, base: BaseModel, enabled: bool) -> BaseModel:
    base.enabled = enabled
    base.save(update_fields=["enabled", "updated_at"])
    return base
