"""The text ``/metrics`` answers: every process's figures plus the scrape-time ones."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import Metric

from webapp.metrics.collectors import CeleryQueueCollector, JobCollector

# prometheus_client's file per process and kind: counter_123.db, gauge_livesum_123.db, ...
_PROCESS_FILE = re.compile(r"^(?P<kind>[a-z_]+)_(?P<pid>\d+)\.db$")


def multiprocess_dir() -> Path | None:
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(folder) if folder else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def mark_dead_processes(folder: Path) -> list[int]:
    """Drop the live gauges of processes that exited (a worker child, a gunicorn worker
    that was recycled), as prometheus_client's ``mark_process_dead`` documents; their
    counters and histograms stay, so totals never go backwards. The folder is per host, so
    a pid that no longer runs here is dead."""
    dead = set()
    for entry in folder.iterdir():
        match = _PROCESS_FILE.match(entry.name)
        if match and match["kind"].startswith("gauge_live") and not _alive(int(match["pid"])):
            dead.add(int(match["pid"]))
    for pid in dead:
        with contextlib.suppress(FileNotFoundError):  # another scrape got there first
            multiprocess.mark_process_dead(pid, str(folder))
    return sorted(dead)


class _ThisProcess:
    """The default registry (this process only), when there is no multiprocess folder."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def metrics_text() -> bytes:
    """The Prometheus text exposition of everything: serving, usage, jobs, queues."""
    registry = CollectorRegistry()
    folder = multiprocess_dir()
    if folder is not None:
        mark_dead_processes(folder)
        multiprocess.MultiProcessCollector(registry, path=str(folder))
    else:
        registry.register(_ThisProcess())
    registry.register(JobCollector())
    registry.register(CeleryQueueCollector())
    return generate_latest(registry)
