"""Fine-tuning jobs of a tiny carry-on, created through the job service and, where asked, run
to the end by the eager tasks they enqueue on commit (the conftests of the eager-task tests
keep them in this process on one torch thread)."""

from __future__ import annotations

from typing import Any

from webapp.customizations.models import FineTuningJob
from webapp.customizations.services.jobs import job_create

# A carry-on small enough to train in well under a second, saving a checkpoint every 2 steps.
TINY = {"d_model": 16, "n_heads": 2, "checkpoint_every": 2}
HYPER = {"n_epochs": 2, "batch_size": 4}


def create_job(user: Any, file: Any, **overrides: Any) -> FineTuningJob:
    """A tiny job of ``user`` on ``file`` (seed 3); ``overrides`` replace any option."""
    options = {"hyperparameters": HYPER, "carry_on": TINY, "seed": 3, **overrides}
    return job_create(user=user, training_file=file.id, **options)


def run_job(capture: Any, user: Any, file: Any, **overrides: Any) -> FineTuningJob:
    """Create a tiny job and let the eager tasks it enqueues on commit run to the end
    (``capture`` is pytest-django's ``django_capture_on_commit_callbacks``)."""
    with capture(execute=True):
        job = create_job(user, file, **overrides)
    job.refresh_from_db()
    return job


def job_messages(job: FineTuningJob) -> list[str]:
    """The messages of the job's events, oldest first."""
    return list(job.events.order_by("seq").values_list("message", flat=True))
