"""Faults, each with real processes: a killed worker, a lost broker, a restarted database,
unwritable storage and a corrupted artifact. The promise under test: a job never stays in
limbo, a fault is answered with a clear error, and the service recovers by itself.

Workers are real ``celery worker`` processes (tests/helpers/celery_workers.py); the server
is a real gunicorn (tests/helpers/servers.py), both on the test database and DATA_DIR.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.utils import timezone

from tests.factories import FileFactory, FineTuningJobFactory, UserFactory
from tests.helpers.carry_on_kit import toy_jsonl
from tests.helpers.celery_workers import Workers
from tests.helpers.servers import StudioServer, TcpProxy
from tests.helpers.services import service_missing
from webapp.accounts.services import api_key_create
from webapp.core.utils import data_path
from webapp.customizations.models import Adapter, FeatureSet, FineTuningJob
from webapp.customizations.services.files import file_create
from webapp.customizations.services.jobs import job_create, job_retry

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

QUICK = {"CARRY_ON_HEARTBEAT_TIMEOUT": "4", "CARRY_ON_HEARTBEAT_INTERVAL": "0.5"}
TINY = {"d_model": 16, "n_heads": 2}


def _wait_terminal(job: FineTuningJob, pool: Workers, timeout: float = 300) -> FineTuningJob:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if job.is_terminal:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job.id} is still {job.status}/{job.stage}\n{pool.tail()}")


def _bearer(user: Any) -> dict[str, str]:
    _, raw = api_key_create(user=user)
    return {"Authorization": f"Bearer {raw}"}


# -- a worker killed during extraction ----------------------------------------------------------


def test_an_embed_worker_killed_during_extraction_is_replaced_and_the_job_completes(
    tiny_base_model: Any, workers: Callable[..., Workers]
) -> None:
    """SIGKILL mid-extraction: the job stays running, then a new worker redoes it to the end."""
    # The claim keeper beats through tokenizing too, so a short timeout only ever catches
    # the killed worker (test_claims.py shows a long silent stage is not taken over).
    pool = workers(**QUICK)
    pool.start("embed", "default,embed")
    pool.start("train", "train")
    user = UserFactory()
    # Enough examples for extraction to take seconds and report progress per shard.
    file = file_create(user=user, upload=SimpleUploadedFile("many.jsonl", toy_jsonl(5000)))
    job = job_create(
        user=user, training_file=file.id, seed=0, carry_on=TINY,
        hyperparameters={"n_epochs": 1, "batch_size": 64},
    )  # fmt: skip
    deadline = time.monotonic() + 120
    # Killed as soon as the embed worker has announced the extraction: waiting for progress
    # raced a quiet machine, where the whole extraction takes well under a second.
    started = job.events.filter(message__startswith="Extracting hidden states")
    while not (job.status == "running" and job.stage == "extracting" and started.exists()):
        assert not job.is_terminal, f"{job.status}: {job.error}\n{pool.tail()}"
        assert job.stage != "training", f"extraction ended before the kill\n{pool.tail()}"
        assert time.monotonic() < deadline, f"{job.status}/{job.stage}\n{pool.tail()}"
        time.sleep(0.05)
        job.refresh_from_db()
    pool.kill("embed")
    job.refresh_from_db()
    assert (job.status, job.stage) == ("running", "extracting"), pool.tail()
    killed = job.worker

    pool.start("embed", "default,embed")
    job = _wait_terminal(job, pool)
    assert job.status == "succeeded", f"{job.error}\n{pool.tail()}"
    assert job.events.filter(message__contains="stopped responding during extracting").exists()
    extractions = job.events.filter(message__startswith="Extracting hidden states")
    workers_seen = [event.data["worker"] for event in extractions.order_by("seq")]
    assert workers_seen[0] == killed
    assert workers_seen[-1] != killed
    for feature_set in (job.train_features, job.valid_features):
        assert feature_set.status == FeatureSet.Status.READY
        assert (data_path(feature_set.path) / "manifest.json").is_file()
    assert Adapter.objects.filter(job=job).exists()


# -- the broker unreachable when a job is created -----------------------------------------------


def _network_broker() -> tuple[str, str, int]:
    url = os.environ.get("CARRY_ON_TEST_BROKER_URL", "")
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "amqp", "pyamqp") or not parts.hostname:
        service_missing("needs a network broker in CARRY_ON_TEST_BROKER_URL (CI uses Redis)")
    default_port = 6379 if parts.scheme == "redis" else 5672
    return url, parts.hostname, parts.port or default_port


def test_an_unreachable_broker_at_job_creation_is_a_503_and_the_service_recovers(
    tiny_base_model: Any,
    workers: Callable[..., Workers],
    studio_server: Callable[..., StudioServer],
) -> None:
    """Broker down: a clear 503 and no job at all. Broker back: the same server creates and
    runs jobs again, with no restart."""
    url, host, port = _network_broker()
    proxy = TcpProxy(host, port)
    try:
        server = studio_server(
            CELERY_BROKER_URL=url.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}")
        )
        user = UserFactory()
        headers = _bearer(user)
        uploaded = requests.post(
            f"{server.url}/v1/files", headers=headers, timeout=60,
            files={"file": ("toy.jsonl", toy_jsonl(16))}, data={"purpose": "fine-tune"},
        )  # fmt: skip
        assert uploaded.status_code == 200, uploaded.text
        body = {
            "model": tiny_base_model.name,
            "training_file": uploaded.json()["id"],
            "hyperparameters": {"n_epochs": 1, "batch_size": 4},
            "carry_on": TINY,
        }

        proxy.down()
        refused = requests.post(
            f"{server.url}/v1/fine_tuning/jobs", json=body, headers=headers, timeout=60
        )
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["code"] == "broker_unavailable"
        assert error["type"] == "server_error"
        assert int(refused.headers["retry-after"]) > 0
        assert not FineTuningJob.objects.exists()  # nothing half-created, nothing orphaned

        proxy.up()
        created = requests.post(
            f"{server.url}/v1/fine_tuning/jobs", json=body, headers=headers, timeout=60
        )
        assert created.status_code == 200, created.text + server.tail()
    finally:
        proxy.down()
    pool = workers(**QUICK)
    pool.start("all", "default,embed,train")
    job = _wait_terminal(FineTuningJob.objects.get(pk=created.json()["id"]), pool)
    assert job.status == "succeeded", f"{job.error}\n{pool.tail()}"


def test_a_job_whose_message_never_reached_the_broker_is_sent_again_by_the_workers(
    tiny_base_model: Any, workers: Callable[..., Workers]
) -> None:
    """A committed job without its message (the web process died before sending it) is
    found by the workers' sweep and runs: no job stays queued forever."""
    user = UserFactory()
    job = FineTuningJobFactory(
        owner=user, training_file=FileFactory(owner=user), status="validating_files"
    )
    FineTuningJob.objects.filter(pk=job.pk).update(updated_at=timezone.now() - timedelta(minutes=1))
    pool = workers(**QUICK, CARRY_ON_REQUEUE_AFTER="5")
    pool.start("all", "default,embed,train")
    job = _wait_terminal(job, pool, timeout=120)
    assert job.status == "succeeded", f"{job.error}\n{pool.tail()}"


# -- the database restarted mid-request ---------------------------------------------------------


def _restart_postgres() -> None:
    ctl = shutil.which("pg_ctlcluster")
    clusters = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if ctl is None or not clusters:
        service_missing("pg_ctlcluster is not available to restart PostgreSQL")
    subprocess.run(
        [ctl, "--skip-systemctl-redirect", clusters[-1], "main", "restart"],
        check=True, timeout=120, capture_output=True,
    )  # fmt: skip


def test_the_service_recovers_from_a_database_restart_without_being_restarted(
    tiny_base_model: Any, studio_server: Callable[..., StudioServer]
) -> None:
    """PostgreSQL restarted under load: requests get 200 or a clear 503, never a 500 or a
    dropped connection, and once it is back every request succeeds on the same server."""
    if connection.vendor != "postgresql":
        service_missing("needs PostgreSQL (CI runs the suite on it)")
    server = studio_server(DATABASE_CONN_MAX_AGE="600", workers=1, threads=4)
    headers = _bearer(UserFactory())
    session = requests.Session()

    def ask() -> int:
        return session.get(f"{server.url}/v1/files", headers=headers, timeout=30).status_code

    assert [ask() for _ in range(8)] == [200] * 8  # persistent connections are open now
    seen: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            seen.append(ask())
            time.sleep(0.02)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        _restart_postgres()
    finally:
        stop.set()
        thread.join(timeout=60)
        connection.close()  # this process's own connection died with the server
    assert seen, "no request was made while the database restarted"
    assert set(seen) <= {200, 503}, (seen, server.tail())
    deadline = time.monotonic() + 30
    while ask() != 200:
        assert time.monotonic() < deadline, server.tail()
        time.sleep(0.2)
    assert [ask() for _ in range(20)] == [200] * 20
    assert server.proc.poll() is None  # the same server, never restarted


# -- artifact storage unwritable ----------------------------------------------------------------


def test_unwritable_storage_fails_the_job_clearly_and_nothing_partial_is_served(
    tiny_base_model: Any, workers: Callable[..., Workers], data_dir: Path
) -> None:
    """The adapter cannot be written: the job fails with storage_error and no model exists;
    once storage is writable again, a retry resumes from the checkpoints and succeeds."""
    from rest_framework.test import APIClient

    pool = workers(**QUICK)
    pool.start("all", "default,embed,train")
    user = UserFactory()
    blocked = data_dir / "adapters"
    blocked.write_bytes(b"")  # a file where the folder must be: every write below it fails
    job = job_create(
        user=user, training_file=FileFactory(owner=user).id, seed=0, suffix="full",
        carry_on={**TINY, "checkpoint_every": 2}, hyperparameters={"n_epochs": 2, "batch_size": 4},
    )  # fmt: skip
    job = _wait_terminal(job, pool)
    assert job.status == "failed", pool.tail()
    assert job.error["code"] == "storage_error"
    assert "could not write to artifact storage" in job.error["message"]
    assert "(adapters)" in job.error["message"]
    assert not Adapter.objects.exists()
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=_bearer(user)["Authorization"])
    name = f"ft:{tiny_base_model.name}:{user.username}:full:{job.id}"
    assert name not in [m["id"] for m in api.get("/v1/models").json()["data"]]
    chat = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    assert api.post("/v1/chat/completions", chat, format="json").status_code == 404

    blocked.unlink()
    job = _wait_terminal(job_retry(job=job), pool)
    assert job.status == "succeeded", f"{job.error}\n{pool.tail()}"
    assert job.events.filter(message__startswith="Resuming training").exists()
    assert api.post("/v1/chat/completions", chat, format="json").status_code == 200


# -- a corrupted artifact ------------------------------------------------------------------------


def test_a_corrupted_artifact_is_refused_at_load_by_a_live_server(
    tiny_base_model: Any,
    make_adapter: Callable[..., Any],
    studio_server: Callable[..., StudioServer],
) -> None:
    """Bytes changed on disk (sha256 mismatch): a clear artifact_error, never served; the
    server keeps serving everything else."""
    user = UserFactory()
    healthy = make_adapter(user, tiny_base_model, seed=1, suffix="ok")
    damaged = make_adapter(user, tiny_base_model, seed=2, suffix="bad")
    weights = data_path(damaged.path) / "carry_on.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)
    server = studio_server(workers=1, threads=4)
    headers = _bearer(user)

    def chat(model: str) -> requests.Response:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        return requests.post(
            f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=120
        )

    refused = chat(damaged.name)
    assert refused.status_code == 500, refused.text
    error = refused.json()["error"]
    assert error["code"] == "artifact_error"
    assert "sha256" in error["message"]
    assert "refusing to load" in error["message"]
    assert chat(healthy.name).status_code == 200
    assert chat(damaged.name).status_code == 500  # still refused, never cached
