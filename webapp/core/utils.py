"""Small helpers shared by the apps: public ids, artifact paths, JSON-safe numbers, the
one-row read of a selector."""

from __future__ import annotations

import math
import secrets
import string
from pathlib import Path
from typing import Any, TypeVar

from django.conf import settings
from django.db.models import Model, QuerySet
from django.utils.deconstruct import deconstructible

from webapp.core.exceptions import NotFoundError

_ALPHABET = string.ascii_letters + string.digits
PUBLIC_ID_LENGTH = 24


def new_public_id(prefix: str) -> str:
    """``file-<24 chars>``, ``ftjob-<24 chars>``: random, URL-safe, unguessable."""
    suffix = "".join(secrets.choice(_ALPHABET) for _ in range(PUBLIC_ID_LENGTH))
    return f"{prefix}-{suffix}"


@deconstructible
class PublicId:
    """A picklable, migration-serializable default for public-id primary keys."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def __call__(self) -> str:
        return new_public_id(self.prefix)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicId) and other.prefix == self.prefix

    def __hash__(self) -> int:
        return hash(self.prefix)


def data_path(relative: str) -> Path:
    """An artifact path stored in the database (relative) made absolute under DATA_DIR."""
    path = (Path(settings.DATA_DIR) / relative).resolve()
    if Path(settings.DATA_DIR).resolve() not in path.parents:
        raise ValueError(f"artifact path {relative!r} escapes the data directory")
    return path


def relative_data_path(path: Path) -> str:
    """An absolute artifact path under DATA_DIR as the database stores it (relative)."""
    return str(Path(path).resolve().relative_to(Path(settings.DATA_DIR).resolve()))


def finite_json(value: Any) -> Any:
    """``value`` with every NaN or infinity replaced by None.

    JSON has no NaN: PostgreSQL refuses the whole row, and a reader (the loss curve)
    would have to guard every number. A diverged run is reported by its error instead.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(item) for item in value]
    return value


RowT = TypeVar("RowT", bound=Model)


def first_or_not_found(rows: QuerySet[RowT], message: str, *, param: str) -> RowT:
    """The first of ``rows`` (a selector's query, already filtered by its user); none is a
    ``NotFoundError``, so another user's row answers exactly as a missing one."""
    row = rows.first()
    if row is None:
        raise NotFoundError(message, param=param)
    return row
