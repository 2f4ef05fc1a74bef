"""Per-process worker runtime: torch set-up, cached base models, heartbeats, the sweeper.

The only module in ``workers`` that touches torch directly (lazily, in function bodies), so
importing the task module stays cheap and torch-free for the web process.
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

from webapp.customizations.models import BaseModel, FineTuningJob
from webapp.customizations.services.pipeline import job_record_progress, job_sweep_stale

logger = logging.getLogger(__name__)

_bases: dict[tuple[str, str], Any] = {}
_bases_lock = threading.Lock()
_torch_ready = False


def worker_identity(request: Any) -> str:
    """Who holds a claim: this host and process, and this task execution."""
    return f"{socket.gethostname()}:{os.getpid()}:{getattr(request, 'id', None) or 'direct'}"


def warm_up() -> None:
    """Import torch and transformers and set threads once, before the first task needs them,
    so a heartbeat never goes stale while a task is still importing."""
    global _torch_ready
    if _torch_ready:
        return
    import torch
    import transformers  # noqa: F401 - imported for its side effect: paying the import cost

    threads = int(settings.CARRY_ON["TORCH_THREADS"])
    if threads > 0:
        torch.set_num_threads(threads)
    _torch_ready = True


def device() -> str:
    wanted = str(settings.CARRY_ON["DEVICE"])
    if wanted != "auto":
        return wanted
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_base(record: BaseModel) -> Any:
    """The record's FrozenBase, loaded once per process and checked against its fingerprint."""
    from customization.base_model import load_base_model
    from customization.errors import IncompatibleBaseModelError

    warm_up()
    key = (record.path, device())
    with _bases_lock:
        if key not in _bases:
            logger.info("loading base model %s from %s on %s", record.name, record.path, key[1])
            base = load_base_model(
                record.path, name=record.name, revision=record.revision or None, device=key[1]
            )
            _bases[key] = base
        base = _bases[key]
    if record.fingerprint_key and base.fingerprint().key != record.fingerprint_key:
        raise IncompatibleBaseModelError(
            f"the files of base model {record.name!r} at {record.path} no longer match the "
            "fingerprint it was registered with; register it again",
            param="model",
        )
    return base


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
    """Re-enqueues jobs whose worker died (see job_sweep_stale), in every worker process.

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
