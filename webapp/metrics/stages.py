"""Timing a worker's job stages for ``carry_on_job_stage_duration_seconds``."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from webapp.metrics import instruments

StageRunner = Callable[..., str]


def timed_stage(run_stage: StageRunner) -> StageRunner:
    """Observe how long each stage ran and how it ended (its return value: done, failed,
    stopped; "retry" when it raised to be retried). A stage with nothing to do (skipped)
    is not counted."""

    @functools.wraps(run_stage)
    def timed(task: Any, job_id: str, stage: str, *args: Any, **kwargs: Any) -> str:
        started = time.monotonic()
        try:
            result = run_stage(task, job_id, stage, *args, **kwargs)
        except Exception:
            instruments.job_stage_duration.labels(stage, "retry").observe(
                time.monotonic() - started
            )
            raise
        if result != "skipped":
            instruments.job_stage_duration.labels(stage, result).observe(time.monotonic() - started)
        return result

    return timed
