"""Small helpers shared by the apps: public ids, atomic artifact writes, paths."""

from __future__ import annotations

import os
import secrets
import shutil
import string
import tempfile
from pathlib import Path

from django.conf import settings
from django.utils.deconstruct import deconstructible

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
    return str(Path(path).resolve().relative_to(Path(settings.DATA_DIR).resolve()))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temp sibling, fsync, rename, fsync the folder: readers never see a partial
    file, and after a crash the name points at the old content or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make the names in ``folder`` durable (a rename is not, until its directory is)."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_artifact(relative: str) -> None:
    """Delete a file or folder under DATA_DIR; a missing one is fine (idempotent)."""
    if not relative:
        return
    path = data_path(relative)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
