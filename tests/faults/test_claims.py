"""Claims under stress, with real worker processes on a real broker: a stage with no
progress callbacks for longer than the heartbeat timeout, a worker frozen until another took
its job over, and a job that no worker consumes.

The broker is CARRY_ON_TEST_BROKER_URL (Redis in CI) or the embedded filesystem broker.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from tests.factories import UserFactory
from tests.helpers.carry_on_kit import toy_jsonl
from tests.helpers.celery_workers import Workers
from webapp.core.utils import data_path
from webapp.customizations.artifacts import upload_tokens_path
from webapp.customizations.models import Adapter, FineTuningJob
from webapp.customizations.services.files import file_create
from webapp.customizations.services.jobs import job_create

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

TINY = {"d_model": 16, "n_heads": 2}


def _wait(
    job: FineTuningJob, pool: Workers, until: Callable[[FineTuningJob], bool], timeout: float
) -> FineTuningJob:
    deadline = time.monotonic() + timeout
    while True:
        job.refresh_from_db()
        if until(job):
            return job
        assert time.monotonic() < deadline, f"{job.status}/{job.stage}: {job.error}\n{pool.tail()}"
        time.sleep(0.1)


def _terminal(job: FineTuningJob, pool: Workers, timeout: float = 300) -> FineTuningJob:
    return _wait(job, pool, lambda j: j.is_terminal, timeout)


def test_a_stage_without_progress_longer_than_the_heartbeat_timeout_is_not_taken_over(
    tiny_base_model: Any, workers: Callable[..., Workers]
) -> None:
    """Validating and tokenizing 8000 examples take longer than a 2 s heartbeat timeout and
    report no progress: the claim is still kept fresh, and no second worker takes over.

    The tokenization stored at upload is removed first, so the stage tokenizes again (as
    it does for a base other than the upload's) and is slow enough to need its heartbeat.
    """
    pool = workers(CARRY_ON_HEARTBEAT_TIMEOUT="2", CARRY_ON_HEARTBEAT_INTERVAL="0.25")
    pool.start("a", "default,embed,train")
    pool.start("b", "default,embed,train")  # its sweeper would take over a silent job
    user = UserFactory()
    file = file_create(user=user, upload=SimpleUploadedFile("many.jsonl", toy_jsonl(8000)))
    data_path(upload_tokens_path(file.path)).unlink()
    job = job_create(
        user=user, training_file=file.id, seed=0, carry_on=TINY,
        hyperparameters={"n_epochs": 1, "batch_size": 64},
    )  # fmt: skip
    beats: set[tuple[str, Any]] = set()

    def validated(job: FineTuningJob) -> bool:
        if job.status == "validating_files" and job.worker:
            beats.add((job.worker, job.heartbeat_at))
        return job.status != "validating_files"

    _wait(job, pool, validated, timeout=120)
    holders = {worker for worker, _ in beats}
    assert len(holders) == 1, beats  # one worker held validation throughout
    assert len(beats) >= 2, "no heartbeat while validating: the claim was not kept"

    job = _terminal(job, pool)
    assert job.status == "succeeded", f"{job.error}\n{pool.tail()}"
    assert not job.events.filter(message__contains="stopped responding").exists(), pool.tail()
    assert job.events.filter(message__startswith="Extracting hidden states").count() == 1
    assert job.events.filter(message__startswith="Training started").count() == 1


def _result_line(pool: Workers, name: str, task: str) -> str | None:
    """The worker's log line reporting how ``task`` ended, if it has ended."""
    for log in sorted(pool.logs.glob(f"{name}-*.log")):
        found = re.findall(rf"{task}\[[^\]]+\] succeeded in [^:]+: '(\w+)'", log.read_text())
        if found:
            return found[-1]
    return None


def test_a_worker_that_lost_its_claim_stops_and_leaves_the_winners_adapter(
    tiny_base_model: Any, workers: Callable[..., Workers]
) -> None:
    """A training worker frozen (SIGSTOP) past the timeout is taken over; the other worker
    finishes the job; woken up, the first one stops and the adapter stays intact."""
    from customization.checkpoint import artifact_sha256

    pool = workers(CARRY_ON_HEARTBEAT_TIMEOUT="3", CARRY_ON_HEARTBEAT_INTERVAL="0.25")
    pool.start("embed", "default,embed")
    frozen = pool.start("a", "train")
    user = UserFactory()
    file = file_create(user=user, upload=SimpleUploadedFile("toy.jsonl", toy_jsonl(64)))
    job = job_create(
        user=user, training_file=file.id, seed=0,
        hyperparameters={"n_epochs": 20, "batch_size": 4},
        carry_on={**TINY, "checkpoint_every": 25},
    )  # fmt: skip
    _wait(job, pool, lambda j: j.is_terminal or j.checkpoints.exists(), timeout=120)
    assert not job.is_terminal, f"finished before the freeze\n{pool.tail()}"
    assert f":{frozen.pid}:" in job.worker
    os.killpg(frozen.pid, signal.SIGSTOP)
    try:
        winner = pool.start("b", "train")
        job = _terminal(job, pool)
        assert job.status == "succeeded", f"{job.error}\n{pool.tail()}"
        adapter = Adapter.objects.get(job=job)
        resumed = job.events.filter(message__startswith="Resuming training").last()
        assert f":{winner.pid}:" in resumed.data["worker"]
    finally:
        os.killpg(frozen.pid, signal.SIGCONT)
    deadline = time.monotonic() + 120
    while (outcome := _result_line(pool, "a", "train_job")) is None:
        assert time.monotonic() < deadline, pool.tail()
        time.sleep(0.2)
    assert outcome == "stopped", pool.tail()
    assert artifact_sha256(data_path(adapter.path)) == adapter.sha256
    job.refresh_from_db()
    assert job.status == "succeeded"


def test_a_job_that_no_worker_takes_fails_after_the_configured_sends(
    tiny_base_model: Any, workers: Callable[..., Workers]
) -> None:
    """Nobody consumes the embed queue: after MAX_REQUEUES sends the job fails with
    no_worker_available, naming the queue, instead of being sent again forever."""
    pool = workers(
        CARRY_ON_HEARTBEAT_TIMEOUT="2", CARRY_ON_HEARTBEAT_INTERVAL="0.25",
        CARRY_ON_REQUEUE_AFTER="1", CARRY_ON_MAX_REQUEUES="2",
    )  # fmt: skip
    pool.start("validator", "default")
    user = UserFactory()
    file = file_create(user=user, upload=SimpleUploadedFile("toy.jsonl", toy_jsonl(16)))
    job = job_create(user=user, training_file=file.id, seed=0, carry_on=TINY)
    job = _terminal(job, pool, timeout=120)
    assert job.status == "failed", pool.tail()
    assert job.error["code"] == "no_worker_available"
    assert "'embed' queue" in job.error["message"]
    assert job.stage == "extracting"
