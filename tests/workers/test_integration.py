"""Real Celery worker processes on a real broker and the test database.

Extraction and training run in two separate workers, one consuming only ``embed`` and one
only ``train`` (as inference and training nodes would), sharing only the database, the
broker and the data directory. The broker is CARRY_ON_TEST_BROKER_URL (Redis in CI) or the
embedded filesystem broker in a temporary folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from tests.factories import PASSWORD, UserFactory
from tests.helpers.carry_on_kit import toy_jsonl
from tests.helpers.celery_workers import Workers
from webapp.core.utils import data_path
from webapp.customizations.models import Adapter, File, FineTuningJob
from webapp.customizations.services.files import file_create
from webapp.customizations.services.jobs import job_create

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

QUEUES = ("default", "embed", "train")


def _event_worker(job: FineTuningJob, prefix: str) -> str:
    event = job.events.filter(message__startswith=prefix).get()
    return str(event.data["worker"])


@pytest.mark.slow
def test_upload_extract_train_on_separate_embed_and_train_workers(
    smollm2: Any, workers: Callable[..., Workers]
) -> None:
    """Upload -> job -> extract (embed worker) -> train (train worker) -> adapter; reuse."""
    from customization.checkpoint import artifact_sha256
    from customization.demo_data import generate_demo_problems

    pool = workers()
    embed = pool.start("embed", "default,embed")
    train = pool.start("train", "train")
    user = UserFactory()
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    rows = generate_demo_problems(24, seed=0)
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    response = client.post("/", {"file": SimpleUploadedFile("demo.jsonl", data)})
    assert response.status_code == 302
    file = File.objects.get()
    assert file.status == "processed", file.report
    response = client.post(
        f"/files/{file.id}/jobs/",
        {"model": smollm2.name, "n_epochs": "1", "batch_size": "8", "suffix": "demo", "seed": "0"},
    )
    assert response.status_code == 302, response.content.decode()
    job = pool.succeeded(FineTuningJob.objects.get(), timeout=600)

    adapter = Adapter.objects.get(job=job)
    assert adapter.name == f"ft:{smollm2.name}:{user.username}:demo:{job.id}"
    assert artifact_sha256(data_path(adapter.path)) == adapter.sha256
    assert f":{embed.pid}:" in _event_worker(job, "Extracting hidden states")
    assert f":{train.pid}:" in _event_worker(job, "Training started")
    assert job.events.filter(type="metrics", data__has_key="train_loss").count() == 3
    assert job.events.filter(type="metrics", data__has_key="valid_loss").count() == 1
    assert job.checkpoints.exists()
    assert job.trained_tokens > 0

    second = job_create(
        user=user,
        model=smollm2.name,
        training_file=file.id,
        hyperparameters={"n_epochs": 1, "batch_size": 8},
        seed=1,
    )
    second = pool.succeeded(second, timeout=600)
    assert second.events.filter(data__extraction_skipped=True).exists()
    assert not second.events.filter(message__startswith="Extracting hidden states").exists()
    assert second.train_features_id == job.train_features_id
    assert f":{train.pid}:" in _event_worker(second, "Training started")


def test_training_worker_killed_mid_run_resumes_from_its_last_checkpoint(
    tiny_base_model: Any, workers: Callable[..., Workers]
) -> None:
    """A SIGKILLed training worker's job is finished from its checkpoint after a restart."""
    pool = workers(CARRY_ON_HEARTBEAT_TIMEOUT="4", CARRY_ON_HEARTBEAT_INTERVAL="0.5")
    pool.start("embed", "default,embed")
    pool.start("train", "train")
    user = UserFactory()
    file = file_create(user=user, upload=SimpleUploadedFile("toy.jsonl", toy_jsonl(64)))
    job = job_create(
        user=user, training_file=file.id, seed=0,
        hyperparameters={"n_epochs": 40, "batch_size": 4},
        carry_on={"d_model": 16, "n_heads": 2, "checkpoint_every": 25},
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not job.checkpoints.exists():
        job.refresh_from_db()
        assert not job.is_terminal, f"finished before the kill: {job.status}\n{pool.tail()}"
        assert time.monotonic() < deadline, f"{job.status}/{job.stage}\n{pool.tail()}"
        time.sleep(0.1)
    pool.kill("train")
    job.refresh_from_db()
    assert job.status == "running", pool.tail()
    killed_at = job.checkpoints.order_by("-step").first().step

    pool.start("train", "train")
    job = pool.succeeded(job, timeout=300)
    resumed = job.events.get(message__startswith="Resuming training")
    assert resumed.data["resumed_at_step"] >= killed_at
    assert job.events.filter(message__contains="stopped responding during training").exists()
    metrics = [e.data for e in job.events.filter(type="metrics", data__has_key="train_loss")]
    total = metrics[0]["total_steps"]
    assert total == 15 * 40  # 58 training examples (6 held out) in batches of 4, 40 epochs
    assert sorted(m["step"] for m in metrics) == list(range(1, total + 1))  # none twice
    assert Adapter.objects.filter(job=job).exists()
