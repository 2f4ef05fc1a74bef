from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _isolated_data(data_dir: Path) -> Path:
    return data_dir
