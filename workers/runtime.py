"""Per-process worker runtime: identity, heartbeats, claims, the stale-job sweeper.

torch set-up, the device and the per-process base cache are not worker concerns alone:
they live in ``webapp.core.runtime``, shared with the serving engine.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from django.conf import settings
from django.db import connection

from webapp.customizations.models import FineTuningJob
from webapp.customizations.services.claims import (
    job_heartbeat,
    job_sweep_stale,
    job_sweep_unclaimed,
)
from webapp.customizations.services.results import job_record_progress
from webapp.evaluations.services import evaluation_sweep_stale

__all__ = [
    "ClaimKeeper",
    "Heartbeat",
    "start_sweeper",
    "stop_sweeper",
    "worker_identity",
]

logger = logging.getLogger(__name__)


def worker_identity(request: Any) -> str:
    """Who holds a claim: this host and process, and this task execution."""
    return f"{socket.gethostname()}:{os.getpid()}:{getattr(request, 'id', None) or 'direct'}"


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


class ClaimKeeper(threading.Thread):
    """Refreshes a claim from a background thread for the whole life of a task.

    Progress callbacks (``Heartbeat``) stop at the work that has none: validating,
    loading the base, tokenizing, loading features, saving. This thread keeps
    ``heartbeat_at`` fresh meanwhile, so only a worker that is really gone (killed,
    frozen, machine lost) is taken over. ``lost`` is set once the claim is gone
    (cancelled, finished, or taken over after a stall), and the thread then ends.
    """

    def __init__(self, job_id: str, worker: str):
        super().__init__(name=f"carry-on-claim-{job_id}", daemon=True)
        self.job_id = job_id
        self.worker = worker
        timeout = float(settings.CARRY_ON["HEARTBEAT_TIMEOUT"])
        interval = float(settings.CARRY_ON["HEARTBEAT_INTERVAL"])
        # Several beats per timeout, however the interval is set (0 in some tests).
        self.interval = min(max(interval, 0.1), timeout / 4)
        self.lost = threading.Event()
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop_event.wait(self.interval):
                try:
                    alive = job_heartbeat(job_id=self.job_id, worker=self.worker)
                except Exception:  # a database blip: the next beat tries again
                    logger.warning("heartbeat of %s failed; retrying", self.job_id, exc_info=True)
                    connection.close()
                    continue
                if not alive:
                    self.lost.set()
                    return
        finally:
            connection.close()  # this thread's own connection

    def __enter__(self) -> ClaimKeeper:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop_event.set()
        self.join(timeout=30)


class Sweeper(threading.Thread):
    """Re-enqueues jobs whose worker died (job_sweep_stale) or whose message was lost
    (job_sweep_unclaimed), and evaluations whose worker died (evaluation_sweep_stale), in
    every worker process.

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
                evaluation_sweep_stale()
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
