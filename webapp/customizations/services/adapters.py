"""Adapters (servable carry-ons): activation and deletion with their artifacts."""

from __future__ import annotations

from django.db import transaction

from webapp.core.utils import remove_artifact
from webapp.customizations.models import Adapter, FeatureSet


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
            paths.append(f"jobs/{adapter.job_id}/checkpoints")
            adapter.job.checkpoints.all().delete()  # type: ignore[union-attr]
        adapter.delete()
        transaction.on_commit(lambda: [remove_artifact(p) for p in paths])


def feature_set_delete(*, feature_set: FeatureSet) -> None:
    """Drop a cached feature set; a later job on its data extracts it again."""
    path = feature_set.path
    with transaction.atomic():
        feature_set.delete()
        transaction.on_commit(lambda: remove_artifact(path))
