from __future__ import annotations

import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest


@pytest.fixture(autouse=True)
def _isolated_data(data_dir: Path) -> Path:
    return data_dir


@pytest.fixture(autouse=True)
def _rate_windows_mid_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rate limits count in fixed windows (a minute, an hour) of the wall clock; a test whose
    requests straddled a boundary saw its counter reset. Their clock is held in the middle
    of a minute and of an hour, moving at most 20 s, so no test crosses a boundary."""
    from webapp.core import ratelimits

    started = time.monotonic()
    middle = math.floor(time.time() / 3600) * 3600 + 1830  # 30 min 30 s into the hour

    def now() -> float:
        return middle + min(time.monotonic() - started, 20.0)

    monkeypatch.setattr(ratelimits, "time", SimpleNamespace(time=now))


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    """Rate limits, quotas and log-in counters live in the cache: each test starts with none
    of the counts an earlier test left (the test client's log-ins count per address)."""
    from django.core.cache import cache

    cache.clear()
