"""Per-process worker runtime: heartbeats, the stale-job sweeper, claims.

torch set-up and the per-process base cache live in ``webapp.serving.runtime`` (shared
with the serving engine) and are re-exported here for the tasks.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connection

from webapp.customizations.models import FineTuningJob
from webapp.customizations.services.pipeline import (
    job_record_progress,
    job_sweep_stale,
    job_sweep_unclaimed,
)
from webapp.serving.runtime import device, load_base, warm_up

__all__ = [
    "Heartbeat",
    "device",
    "latest_checkpoint_step",
    "load_base",
    "start_sweeper",
    "stop_sweeper",
    "warm_up",
    "worker_identity",
]

logger = logging.getLogger(__name__)


def worker_identity(request: Any) -> str:
    """Who holds a claim: this host and process, and this task execution."""
    return f"{socket.gethostname()}:{os.getpid()}:{getattr(request, 'id', None) or 'direct'}"


def latest_checkpoint_step(folder: Path) -> int | None:
    """Step of the newest complete checkpoint (its trainer state JSON is written last)."""
    from customization.training import TRAINER_STATE

    steps = [
        int(path.name.split("-")[1])
        for path in folder.glob("step-*")
        if (path / f"{TRAINER_STATE}.json").is_file()
    ]
    return max(steps) if steps else None


class Heartbeat:
    """Keeps a job's claim fresh from inside the work (progress and cancel callbacks).

    Throttled to one write per HEARTBEAT_INTERVAL; ``should_stop`` turns True once the job
    was cancelled or another worker took it over after this one stalled.
    """

    def __init__(self, job: FineTuningJob, worker: str):
        self.job = job
        self.worker = worker
        self.interval = float(settings.CARRY_ON["HEARTBEAT_INTERVAL"])
        self.fraction = 0.0
        self.trained_tokens: int | None = None
        self.stopped = False
        self._last = time.monotonic()

    def update(self, fraction: float, trained_tokens: int | None = None) -> None:
        self.fraction = fraction
        if trained_tokens is not None:
            self.trained_tokens = trained_tokens
        self.beat()

    def beat(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if self.stopped or (not force and now - self._last < self.interval):
            return
        self._last = now
        alive = job_record_progress(
            job=self.job,
            worker=self.worker,
            fraction=self.fraction,
            trained_tokens=self.trained_tokens,
        )
        if not alive:
            logger.warning("job %s was cancelled or taken over; stopping", self.job.pk)
            self.stopped = True

    def should_stop(self) -> bool:
        self.beat()
        return self.stopped


class Sweeper(threading.Thread):
    """Re-enqueues jobs whose worker died (job_sweep_stale) or whose message was lost
    (job_sweep_unclaimed), in every worker process.

    Beat-free: each worker sweeps at start and then every half heartbeat timeout; the
    conditional UPDATE in the service lets only one of them act on a stale job.
    """

    def __init__(self) -> None:
        super().__init__(name="carry-on-sweeper", daemon=True)
        self.interval = max(1.0, int(settings.CARRY_ON["HEARTBEAT_TIMEOUT"]) / 2)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            try:
                swept = job_sweep_stale()
                if swept:
                    logger.warning("re-queued stale jobs: %s", ", ".join(swept))
                job_sweep_unclaimed()
            except Exception:
                logger.exception("the stale-job sweep failed; trying again later")
            finally:
                connection.close()
            if self._stop_event.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop_event.set()


_sweeper: Sweeper | None = None


def start_sweeper() -> None:
    global _sweeper
    if _sweeper is None:
        _sweeper = Sweeper()
        _sweeper.start()


def stop_sweeper() -> None:
    global _sweeper
    if _sweeper is not None:
        _sweeper.stop()
        _sweeper = None
