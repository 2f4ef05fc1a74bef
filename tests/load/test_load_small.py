"""A bounded loopback load test: concurrent uploads, job creations and chats on a real
server (gunicorn, two processes) over the tiny base. Nothing fails with a 5xx, nothing the
server acknowledged is lost, and overload is answered with 429 and retry-after.

The driver is bench/load_bench.py's ``run_load`` (the larger run lives there); nothing here
asserts on time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bench.load_bench import LoadPlan, run_load
from tests.factories import UserFactory
from tests.helpers.servers import StudioServer
from webapp.accounts.services import api_key_create
from webapp.customizations.models import File, FineTuningJob
from workers.celery_app import app

pytestmark = [pytest.mark.load, pytest.mark.integration, pytest.mark.django_db(transaction=True)]

PLAN = LoadPlan(
    uploads=20, jobs=10, chats=40, concurrency=8, rows_per_upload=10, max_tokens=8,
    burst=16, bursts=3, burst_choices=2,
)  # fmt: skip


def _queued_messages(queue: str) -> int:
    with app.connection_for_write() as conn:
        return int(conn.default_channel.queue_declare(queue=queue, passive=True).message_count)


def test_concurrent_load_loses_nothing_never_fails_and_sheds_overload_with_429(
    tiny_base_model: Any,
    broker: dict[str, str],
    studio_server: Callable[..., StudioServer],
) -> None:
    """Zero 5xx, zero unanswered requests, every acknowledged upload and job stored and
    enqueued, and bursts past the engine's limit answered 429 with retry-after."""
    # Two engine slots per process: a burst of n=2 requests cannot all be admitted.
    server = studio_server(**broker, CARRY_ON_SERVING_MAX_PENDING="2")
    _, key = api_key_create(user=UserFactory(), name="load")

    report = run_load(server.url, key, tiny_base_model.name, PLAN)
    summary = report.summary()

    assert summary["server_errors"] == 0, (summary, server.tail())
    assert summary["no_answer"] == 0, summary
    for kind in ("upload", "job", "chat"):  # 429s were retried after their retry-after
        assert summary["mixed"][kind]["final_statuses"] == {"200": PLAN_COUNTS[kind]}, summary
    uploads, jobs = report.created("upload"), report.created("job")
    assert uploads == set(File.objects.values_list("pk", flat=True))
    assert jobs == set(FineTuningJob.objects.values_list("pk", flat=True))
    assert (len(uploads), len(jobs)) == (PLAN.uploads, PLAN.jobs)
    assert summary["lost_uploads"] == summary["lost_jobs"] == []
    assert _queued_messages("default") == PLAN.jobs  # each job's validation task is queued

    burst = summary["burst"]["burst-chat"]
    assert set(burst["final_statuses"]) <= {"200", "429"}, burst
    assert burst["final_statuses"].get("429", 0) > 0, burst  # overload was shed, not queued
    assert summary["429_without_retry_after"] == 0


PLAN_COUNTS = {"upload": PLAN.uploads, "job": PLAN.jobs, "chat": PLAN.chats}
