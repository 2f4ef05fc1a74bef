"""``/metrics``: Prometheus text for staff and the operator's token only, with serving,
queue and job figures gathered from every process (web and Celery workers)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from tests.factories import UserFactory
from tests.helpers.carry_on_kit import toy_jsonl
from tests.helpers.celery_workers import Workers
from webapp.accounts.services import api_key_create

pytestmark = pytest.mark.django_db(transaction=True)

TOKEN = "scrape-token-for-tests-0123456789"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(autouse=True)
def _metrics_token(settings: Any) -> Iterator[None]:
    from webapp.serving.engine import reset_engine

    settings.CARRY_ON = {**settings.CARRY_ON, "METRICS_TOKEN": TOKEN, "METRICS_SAMPLE_SECONDS": 0.1}
    reset_engine()
    yield
    reset_engine()


def parse(text: str) -> Samples:
    """Every sample, by name and labels; the parser refuses malformed exposition text."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(client: Client) -> Samples:
    response = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    return parse(response.content.decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_are_refused_without_a_staff_session_or_the_token(settings: Any) -> None:
    """Anonymous and wrong-token requests get 401, a signed-in non-staff user 403; a staff
    session and the configured token read the figures."""
    anonymous = Client()
    refused = anonymous.get("/metrics")
    assert refused.status_code == 401
    assert refused["WWW-Authenticate"].startswith("Bearer")
    assert anonymous.get("/metrics", HTTP_AUTHORIZATION="Bearer nope").status_code == 401
    user = Client()
    user.force_login(UserFactory())
    assert user.get("/metrics").status_code == 403
    _, raw = api_key_create(user=UserFactory(is_staff=True))
    assert anonymous.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {raw}").status_code == 401
    staff = Client()
    staff.force_login(UserFactory(is_staff=True))
    assert staff.get("/metrics").status_code == 200
    assert scrape(anonymous)  # the token
    settings.CARRY_ON = {**settings.CARRY_ON, "METRICS_TOKEN": ""}
    assert anonymous.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 401


def _wait(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@pytest.mark.integration
def test_figures_move_when_a_job_runs_and_a_chat_streams(
    live_server: Any, tiny_base_model: Any, workers: Callable[..., Workers]
) -> None:
    """A job waits in the broker's queue, then real workers run it (queue depth, job
    counts and stage durations from the worker processes); a streamed chat moves the
    serving figures by its own usage."""
    from webapp.customizations.models import FineTuningJob
    from webapp.customizations.services.files import file_create
    from webapp.customizations.services.jobs import job_create

    scraper = Client()
    before = scrape(scraper)
    assert value(before, "carry_on_metrics_source_up", source="broker") == 1
    assert value(before, "carry_on_metrics_source_up", source="database") == 1

    user = UserFactory()
    file = file_create(user=user, upload=SimpleUploadedFile("toy.jsonl", toy_jsonl(16)))
    job = job_create(
        user=user, training_file=file.id, seed=0,
        hyperparameters={"n_epochs": 1, "batch_size": 8}, carry_on={"d_model": 16, "n_heads": 2},
    )  # fmt: skip
    queued = scrape(scraper)
    assert value(queued, "carry_on_celery_queue_depth", queue="default") == 1
    assert value(queued, "carry_on_jobs", status="validating_files") == 1

    pool = workers()
    pool.start("all", "default,embed,train")

    def finished() -> bool:
        job.refresh_from_db()
        return job.is_terminal

    _wait(finished, f"the job did not finish\n{pool.tail()}", timeout=300)
    assert job.status == FineTuningJob.Status.SUCCEEDED, job.error
    after_job = scrape(scraper)
    assert value(after_job, "carry_on_jobs", status="succeeded") == 1
    assert value(after_job, "carry_on_jobs", status="validating_files") == 0
    for queue in ("default", "embed", "train"):
        assert value(after_job, "carry_on_celery_queue_depth", queue=queue) == 0
    stage_runs = "carry_on_job_stage_duration_seconds_count"
    for stage in ("validating", "training"):
        ran = value(after_job, stage_runs, stage=stage, result="done")
        assert ran == value(before, stage_runs, stage=stage, result="done") + 1, stage

    _, raw = api_key_create(user=user)
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=raw, max_retries=0)
    stream = client.chat.completions.create(
        model=tiny_base_model.name,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = list(stream)[-1].usage
    assert usage is not None
    model = tiny_base_model.name

    steps, rows = "carry_on_engine_decode_steps_total", "carry_on_engine_decode_rows_total"

    def sampled() -> bool:  # the engine's own counters reach /metrics within a sample
        now = scrape(scraper)
        grown = value(now, steps, model=model) - value(before, steps, model=model)
        return value(now, "carry_on_chat_in_flight", model=model) == 0 and grown >= (
            usage.completion_tokens - 1  # the first token comes from the prompt's forward
        )

    _wait(sampled, "the engine's figures were not sampled", timeout=30)
    after = scrape(scraper)
    tokens = "carry_on_chat_generated_tokens_total"
    assert value(after, tokens, model=model) - value(before, tokens, model=model) == (
        usage.completion_tokens
    )
    prompt = "carry_on_chat_prompt_tokens_total"
    assert value(after, prompt, model=model) - value(before, prompt, model=model) == (
        usage.prompt_tokens
    )
    requests = sum(
        value(after, "carry_on_chat_requests_total", model=model, outcome=o)
        - value(before, "carry_on_chat_requests_total", model=model, outcome=o)
        for o in ("stop", "length")
    )
    assert requests == 1
    for histogram in ("time_to_first_token_seconds", "request_duration_seconds"):
        name = f"carry_on_chat_{histogram}_count"
        assert value(after, name, model=model) == value(before, name, model=model) + 1
    assert value(after, rows, model=model) - value(before, rows, model=model) >= (
        value(after, steps, model=model) - value(before, steps, model=model)
    )
    assert ("carry_on_engine_batch_size", frozenset({("model", model)})) in after
    assert ("carry_on_engine_kv_cache_bytes", frozenset({("model", model)})) in after
    assert ("carry_on_adapter_cache_entries", frozenset()) in after


def test_processes_that_exited_keep_their_counts_but_not_their_live_gauges() -> None:
    """A worker process's figures reach /metrics through the shared folder; once it has
    exited its live gauges are dropped at the next scrape and its counters stay."""
    import os
    import subprocess
    import sys

    from webapp.metrics.exposition import metrics_text

    script = (
        "from prometheus_client import Counter, Gauge\n"
        "Gauge('carry_on_test_exited_busy', 'x', multiprocess_mode='livesum').set(5)\n"
        "Counter('carry_on_test_exited_done', 'x').inc(2)\n"
    )
    folder = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])  # webapp/settings/test.py
    worker = subprocess.Popen([sys.executable, "-c", script], env=os.environ.copy())
    assert worker.wait(timeout=60) == 0
    live_gauges = folder / f"gauge_livesum_{worker.pid}.db"
    assert live_gauges.exists()
    samples = parse(metrics_text().decode())
    assert value(samples, "carry_on_test_exited_done_total") == 2
    assert ("carry_on_test_exited_busy", frozenset()) not in samples
    assert not live_gauges.exists()
