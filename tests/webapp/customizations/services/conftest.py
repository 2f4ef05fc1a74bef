"""The job services run their eager tasks in this process, with one torch thread
(tests/conftest.py) on the private data folder every web test gets (tests/webapp/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _eager_tasks(one_torch_thread: None) -> None:
    """Every test here trains with one torch thread."""
