"""Adapters (carry-ons and tails): renaming, activation, deletion and the download bundle."""

from __future__ import annotations

import re
import tempfile
import zipfile
from typing import IO

from django.db import transaction

from webapp.core.exceptions import ApplicationError
from webapp.core.utils import data_path
from webapp.customizations.artifacts import checkpoints_folder, remove_artifact
from webapp.customizations.models import Adapter, FeatureSet

# The files an artifact of each kind cannot be without (docs/architecture.md, "Artifacts": a
# tail is a standard PEFT LoRA folder plus carry_on_tail.json); the bundle holds every file.
BUNDLE_FILES = ("carry_on.safetensors", "carry_on_config.json")
REQUIRED_FILES = {
    "carry_on": BUNDLE_FILES,
    "tail": ("adapter_config.json", "adapter_model.safetensors", "carry_on_tail.json"),
}
LABEL_MAX = 100
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._-]+")


def adapter_rename(*, adapter: Adapter, label: str) -> Adapter:
    """Set the name shown in the browser; the API's model id (``name``) never changes."""
    label = _CONTROL.sub("", label).strip()
    if len(label) > LABEL_MAX:
        raise ApplicationError(f"a name is at most {LABEL_MAX} characters", param="label")
    if adapter.label != label:
        adapter.label = label
        adapter.save(update_fields=["label", "updated_at"])
    return adapter


def adapter_bundle_filename(adapter: Adapter) -> str:
    """A download name made only of safe characters, from the adapter's names."""
    stem = _UNSAFE_FILENAME.sub("-", adapter.label or adapter.name).strip("-._")[:80]
    return f"{stem or 'adapter'}.zip"


def adapter_bundle(*, adapter: Adapter) -> IO[bytes]:
    """A zip of every file of the artifact's folder, as a rewound temporary file."""
    folder = data_path(adapter.path)
    required = REQUIRED_FILES.get(adapter.kind, BUNDLE_FILES)
    missing = [name for name in required if not (folder / name).is_file()]
    if missing:
        raise ApplicationError(
            f"the artifact of {adapter.name} is missing from storage ({', '.join(missing)})",
            code="artifact_missing",
            status=500,
            type="server_error",
        )
    bundle = tempfile.TemporaryFile()  # noqa: SIM115 (the response closes it)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    with zipfile.ZipFile(bundle, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            archive.write(path, arcname=path.relative_to(folder).as_posix())
    bundle.seek(0)
    return bundle


def adapter_set_active(*, adapter: Adapter, active: bool) -> Adapter:
    """An inactive adapter stays listed for its owner but is not served."""
    if adapter.active != active:
        adapter.active = active
        adapter.save(update_fields=["active", "updated_at"])
    return adapter


def adapter_delete(*, adapter: Adapter) -> None:
    """Delete the adapter, its job's checkpoints and both artifacts (after commit)."""
    paths = [adapter.path]
    with transaction.atomic():
        if adapter.job_id is not None:
            paths.append(checkpoints_folder(adapter.job_id))
            adapter.job.checkpoints.all().delete()  # type: ignore[union-attr]
        adapter.delete()
        transaction.on_commit(lambda: [remove_artifact(p) for p in paths])


def feature_set_delete(*, feature_set: FeatureSet) -> None:
    """Drop a cached feature set; a later job on its data extracts it again."""
    path = feature_set.path
    with transaction.atomic():
        feature_set.delete()
        transaction.on_commit(lambda: remove_artifact(path))
