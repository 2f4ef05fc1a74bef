"""Where artifacts live under DATA_DIR, how they are written and how they are removed.

The database stores paths relative to DATA_DIR (``webapp.core.utils.data_path`` makes them
absolute). The layout::

    files/<file id>.jsonl                   an upload
    files/<file id>.tokens.json             its examples tokenized at upload (services/files.py)
    features/<key>/manifest.json, ...       a feature set (written by customization.features)
    jobs/<job id>/checkpoints/step-<N>/     a job's checkpoints (customization.checkpoint)
    adapters/<job id>-<attempt>/            a trained adapter, one folder per training attempt

Every write goes to a temporary sibling that is renamed into place (customization.durable),
and a record points at an artifact only once it is complete.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from pathlib import Path

from customization.durable import replace_durably
from webapp.core.utils import data_path

FILES = "files"
FEATURES = "features"
JOBS = "jobs"
ADAPTERS = "adapters"
AREAS = (FILES, FEATURES, JOBS, ADAPTERS)
CHECKPOINTS = "checkpoints"
# What customization.features writes last: a feature set without it is incomplete.
FEATURE_MANIFEST = "manifest.json"


def upload_path(file_id: str) -> str:
    """The stored content of an uploaded file."""
    return f"{FILES}/{file_id}.jsonl"


def upload_tokens_path(upload: str) -> str:
    """Where the tokenization computed at upload sits, beside the upload (its stored path)."""
    return upload.removesuffix(".jsonl") + ".tokens.json"


def features_root() -> Path:
    """The folder feature sets are extracted into (one sub-folder per cache key)."""
    return data_path(FEATURES)


def feature_set_complete(relative: str) -> bool:
    """Whether a feature set's folder is still completely on disk."""
    return (data_path(relative) / FEATURE_MANIFEST).is_file()


def job_folder(job_id: str) -> str:
    """Everything a job writes besides its adapter."""
    return f"{JOBS}/{job_id}"


def checkpoints_folder(job_id: str) -> str:
    return f"{job_folder(job_id)}/{CHECKPOINTS}"


def adapter_path(job_id: str) -> str:
    """Where this attempt writes the job's adapter.

    Unique per attempt: a worker that lost its claim (stalled, then taken over) and
    removes what it wrote can never remove the adapter the winner registered.
    """
    return f"{ADAPTERS}/{job_id}-{secrets.token_hex(6)}"


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temp sibling, then rename it durably: readers never see a partial file,
    and after a crash the name points at the old content or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        replace_durably(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_artifact(relative: str) -> None:
    """Delete a file or folder under DATA_DIR; a missing one is fine (idempotent)."""
    if not relative:
        return
    path = data_path(relative)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
