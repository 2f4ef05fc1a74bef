"""Usage tests: a lively tiny base and a fresh serving engine (the usage buffer starts and
ends empty in every test: tests/conftest.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.webapp.api.conftest import lively_base_dir, lively_base_model  # noqa: F401


@pytest.fixture(autouse=True)
def _fresh_engine() -> Iterator[None]:
    """No engine or decode thread crosses from one test to another."""
    from webapp.serving.engine import reset_engine

    reset_engine()
    yield
    reset_engine()


def wait_for_records(user: Any, n: int, timeout: float = 30.0) -> list[Any]:
    """The user's usage records once ``n`` are written (this process's buffer is flushed
    here; a server's writes itself), oldest first."""
    from webapp.usage.models import UsageRecord
    from webapp.usage.services import usage_flush

    deadline = time.monotonic() + timeout
    while True:
        usage_flush()
        records = list(UsageRecord.objects.filter(user=user).order_by("created_at"))
        if len(records) >= n or time.monotonic() > deadline:
            return records
        time.sleep(0.05)
