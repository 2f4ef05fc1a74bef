"""Figures read at scrape time, from where the truth is: the database and the broker.

Only the process answering ``/metrics`` runs these, so nothing is double-counted across
processes. A source that cannot be read is reported as ``carry_on_metrics_source_up 0``
and its figures are left out, rather than failing the scrape.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from django.conf import settings
from prometheus_client.core import GaugeMetricFamily, Metric

logger = logging.getLogger(__name__)


def celery_queues() -> list[str]:
    """Every queue the service sends tasks to: the default one and each routed one."""
    queues = {settings.CELERY_TASK_DEFAULT_QUEUE}
    queues.update(route["queue"] for route in settings.CELERY_TASK_ROUTES.values())
    return sorted(queues)


def _source_up(name: str, up: bool) -> GaugeMetricFamily:
    family = GaugeMetricFamily(
        "carry_on_metrics_source_up",
        "Whether this scrape could read a source (database, broker).",
        labels=["source"],
    )
    family.add_metric([name], 1.0 if up else 0.0)
    return family


class JobCollector:
    """Fine-tuning jobs by status and, for the unfinished ones, by stage."""

    def collect(self) -> Iterator[Metric]:
        from django.db.models import Count

        from webapp.customizations.models import FineTuningJob

        try:
            by_status = dict(
                FineTuningJob.objects.values_list("status").annotate(n=Count("pk")).order_by()
            )
            waiting = ("validating_files", "queued", "running")
            active = FineTuningJob.objects.filter(status__in=waiting)
            by_stage = list(
                active.values_list("status", "stage").annotate(n=Count("pk")).order_by()
            )
        except Exception as exc:  # a scrape must not fail with the database
            logger.warning("metrics: jobs unreadable: %s", exc)
            yield _source_up("database", False)
            return
        jobs = GaugeMetricFamily("carry_on_jobs", "Fine-tuning jobs by status.", labels=["status"])
        for status in FineTuningJob.Status.values:
            jobs.add_metric([status], float(by_status.get(status, 0)))
        yield jobs
        stages = GaugeMetricFamily(
            "carry_on_jobs_active",
            "Unfinished jobs by status and the stage they wait for or run.",
            labels=["status", "stage"],
        )
        for status, stage, n in by_stage:
            stages.add_metric([status, stage or "none"], float(n))
        yield stages
        yield _source_up("database", True)


class CeleryQueueCollector:
    """Messages waiting in each Celery queue, asked of the broker (Redis, RabbitMQ or the
    embedded filesystem broker alike, through kombu)."""

    def collect(self) -> Iterator[Metric]:
        from kombu.exceptions import ChannelError

        from webapp.celery import app

        depth = GaugeMetricFamily(
            "carry_on_celery_queue_depth",
            "Tasks waiting in a Celery queue (not yet taken by a worker).",
            labels=["queue"],
        )
        try:
            with app.connection_for_read() as conn:
                conn.ensure_connection(max_retries=1)
                for queue in celery_queues():
                    with conn.channel() as channel:
                        try:
                            _, count, _ = channel.queue_declare(queue=queue, passive=True)
                        except ChannelError:  # never declared, or empty (Redis drops it)
                            count = 0
                    depth.add_metric([queue], float(count))
        except Exception as exc:  # a scrape must not fail with the broker
            logger.warning("metrics: broker unreadable: %s", exc)
            yield _source_up("broker", False)
            return
        yield depth
        yield _source_up("broker", True)
