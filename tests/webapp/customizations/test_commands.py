"""Operator management commands."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command

from tests.factories import AdapterFactory, FineTuningJobFactory
from webapp.accounts.models import User
from webapp.accounts.selectors import api_key_authenticate
from webapp.core.utils import data_path
from webapp.customizations.artifacts import write_bytes_atomic
from webapp.customizations.models import BaseModel

pytestmark = pytest.mark.django_db


def _call(*args: Any) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_create_user_prints_a_working_api_key_once() -> None:
    """The printed key authenticates the new user; only its hash is stored."""
    output = _call("create_user", "alice", "--email", "a@example.com")
    raw = output.strip().splitlines()[-1].split(": ", 1)[1]
    key = api_key_authenticate(raw_key=raw)
    assert key is not None
    assert key.user == User.objects.get(username="alice")
    assert not key.user.has_usable_password()


def test_register_base_model_from_a_folder(tiny_base_dir: Path) -> None:
    """A local HF folder is fingerprinted and registered; the first base becomes default."""
    output = _call("register_base_model", str(tiny_base_dir), "--name", "tiny-op")
    base = BaseModel.objects.get(name="tiny-op")
    assert base.is_default
    assert base.source_type == "folder"
    assert len(base.fingerprint_key) == 32
    assert base.fingerprint["hidden_size"] == 32
    assert "registered tiny-op (default)" in output


def test_list_jobs_shows_status_and_model(tiny_base_model: Any) -> None:
    """Jobs are listed newest first with their outcome, filterable by status."""
    adapter = AdapterFactory()
    failed = FineTuningJobFactory(status="failed", error={"code": "c", "message": "bad data"})
    output = _call("list_jobs")
    assert adapter.job.id in output
    assert adapter.name in output
    assert "bad data" in output
    only_failed = _call("list_jobs", "--status", "failed")
    assert failed.id in only_failed
    assert adapter.job.id not in only_failed


def test_gc_artifacts_removes_only_orphans(tiny_base_model: Any, data_dir: Path) -> None:
    """Unreferenced, old artifacts go; referenced or fresh ones stay."""
    adapter = AdapterFactory()
    orphan = data_path("adapters/ftjob-gone")
    write_bytes_atomic(orphan / "carry_on.safetensors", b"x")
    fresh = data_path("files/file-justwritten.jsonl")
    write_bytes_atomic(fresh, b"{}")
    old = time.time() - 7200
    for path in (orphan, data_path(adapter.path)):
        os.utime(path, (old, old))
    dry = _call("gc_artifacts", "--dry-run")
    assert "would remove adapters/ftjob-gone" in dry
    assert orphan.exists()
    _call("gc_artifacts")
    assert not orphan.exists()
    assert fresh.exists()  # younger than the grace period
    assert data_path(adapter.path).exists()
