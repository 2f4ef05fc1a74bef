from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _isolated_data(data_dir: Path) -> Path:
    return data_dir


@pytest.fixture(autouse=True)
def _one_torch_thread(settings: Any) -> Iterator[None]:
    """Eager tasks train tiny models in this process: intra-op threads only slow them down."""
    import torch

    from workers import runtime

    settings.CARRY_ON = {**settings.CARRY_ON, "TORCH_THREADS": 1}
    previous = torch.get_num_threads()
    runtime.warm_up()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def quick_heartbeat(settings: Any) -> None:
    """Heartbeats (and cancel checks) on every callback instead of every few seconds."""
    settings.CARRY_ON = {**settings.CARRY_ON, "HEARTBEAT_INTERVAL": 0}
