"""Real Celery worker processes on a real broker and the test database.

Extraction and training run in two separate workers, one consuming only ``embed`` and one
only ``train`` (as inference and training nodes would), sharing only the database, the
broker and the data directory. The broker is CARRY_ON_TEST_BROKER_URL (Redis in CI) or the
embedded filesystem broker in a temporary folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test import Client

from tests.factories import PASSWORD, UserFactory
from tests.helpers.carry_on_kit import toy_jsonl
from webapp.core.utils import data_path
from webapp.customizations.models import Adapter, File, FineTuningJob
from webapp.customizations.services.files import file_create
from webapp.customizations.services.jobs import job_create
from workers.celery_app import app

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

REPO = Path(__file__).resolve().parents[2]
QUEUES = ("default", "embed", "train")


def _database_url() -> str:
    """The test database as a URL the worker processes can open."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    return (
        f"postgres://{db['USER']}{password}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}"
        f"/{db['NAME']}"
    )


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Point this process's Celery app at the test broker; yield the workers' environment."""
    url = os.environ.get("CARRY_ON_TEST_BROKER_URL", "")
    env = {"CELERY_BROKER_URL": url or "filesystem://"}
    if url.startswith("redis"):
        options: dict[str, Any] = {"visibility_timeout": 3600}
    elif url:
        options = {}
    else:
        folder = tmp_path / "broker"
        env["CARRY_ON_BROKER_DIR"] = str(folder)
        options = {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
        }
        for name in ("queue", "control"):
            (folder / name).mkdir(parents=True)
    saved = {
        k: app.conf[k] for k in ("broker_url", "broker_transport_options", "task_always_eager")
    }
    app.conf.update(
        broker_url=env["CELERY_BROKER_URL"],
        broker_transport_options=options,
        task_always_eager=False,
    )
    _forget_producers()
    with app.connection_for_write() as conn:
        for queue in QUEUES:
            conn.default_channel.queue_declare(queue=queue, durable=True, auto_delete=False)
            conn.default_channel.queue_purge(queue)
    yield env
    app.conf.update(saved)
    _forget_producers()


def _forget_producers() -> None:
    """Celery caches its producer pool per app: drop it so the next send uses this broker."""
    app._pool = None
    app.amqp._producer_pool = None


class Workers:
    """Starts and stops real ``celery worker`` processes against the test database."""

    def __init__(self, env: dict[str, str], logs: Path):
        self.env = env
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, queues: str) -> subprocess.Popen[bytes]:
        log = self.logs / f"{name}-{len(self.procs)}.log"
        command = [
            sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
            "-Q", queues, "-n", f"{name}-{os.getpid()}@%h", "--pool=solo", "--loglevel=INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        with log.open("wb") as out:
            proc = subprocess.Popen(
                command,
                cwd=REPO,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        deadline = time.monotonic() + 180
        while b"ready." not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker {name} did not start:\n{self.tail()}")
            time.sleep(0.3)
        return proc

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def tail(self, lines: int = 40) -> str:
        chunks = []
        for log in sorted(self.logs.glob("*.log")):
            text = log.read_text("utf-8", errors="replace").splitlines()[-lines:]
            chunks.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(chunks)


@pytest.fixture
def workers(
    broker: dict[str, str], data_dir: Path, tmp_path: Path
) -> Iterator[Callable[..., Workers]]:
    started: list[Workers] = []

    def make(**extra_env: str) -> Workers:
        env = {
            **os.environ,
            **broker,
            "DJANGO_SETTINGS_MODULE": "webapp.settings.test",
            "CELERY_TASK_ALWAYS_EAGER": "0",
            "DATABASE_URL": _database_url(),
            "CARRY_ON_DATA_DIR": str(data_dir),
            "CARRY_ON_MODELS_DIR": str(settings.MODELS_DIR),
            "CARRY_ON_TORCH_THREADS": "1",
            **extra_env,
        }
        logs = tmp_path / "logs"
        logs.mkdir(exist_ok=True)
        pool = Workers(env, logs)
        started.append(pool)
        return pool

    yield make
    for pool in started:
        pool.stop()


def _wait_for(job: FineTuningJob, pool: Workers, *, timeout: float = 600) -> FineTuningJob:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job.refresh_from_db()
        if job.is_terminal:
            assert job.status == "succeeded", f"{job.error}\n{pool.tail()}"
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job.id} is still {job.status}/{job.stage}\n{pool.tail()}")


def _event_worker(job: FineTuningJob, prefix: str) -> str:
    event = job.events.filter(message__startswith=prefix).get()
    return str(event.data["worker"])


@pytest.fixture
def smollm2(db: None) -> Any:
    """The real bundled base, registered as the default (skipped where it is not prepared)."""
    from customization.base_model import BUNDLED_NAME, load_base_model
    from webapp.customizations.services.base_models import base_model_register

    folder = Path(settings.MODELS_DIR) / BUNDLED_NAME
    if not (folder / "model.safetensors").is_file():
        pytest.skip("the bundled base is not prepared (manage.py prepare_base_model)")
    fingerprint = load_base_model(folder, name=BUNDLED_NAME).fingerprint().to_dict()
    return base_model_register(
        name=BUNDLED_NAME,
        source="bundled",
        source_type="bundled",
        path=folder,
        fingerprint=fingerprint,
        default=True,
    )


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
    job = _wait_for(FineTuningJob.objects.get(), pool)

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
    second = _wait_for(second, pool)
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
    job = _wait_for(job, pool, timeout=300)
    resumed = job.events.get(message__startswith="Resuming training")
    assert resumed.data["resumed_at_step"] >= killed_at
    assert job.events.filter(message__contains="stopped responding during training").exists()
    metrics = [e.data for e in job.events.filter(type="metrics", data__has_key="train_loss")]
    total = metrics[0]["total_steps"]
    assert total == 15 * 40  # 58 training examples (6 held out) in batches of 4, 40 epochs
    assert sorted(m["step"] for m in metrics) == list(range(1, total + 1))  # none twice
    assert Adapter.objects.filter(job=job).exists()
