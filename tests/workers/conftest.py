"""The worker tests run their eager tasks in this process, on a private data folder with one
torch thread (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _eager_tasks(data_dir: Path, one_torch_thread: None) -> None:
    """Every test here gets a fresh data folder and one torch thread."""
