"""Real Celery worker processes for integration tests: a test broker and a worker pool.

Loaded as a pytest plugin by tests/conftest.py (fixtures ``broker`` and ``workers``).

The broker is CARRY_ON_TEST_BROKER_URL (Redis in CI) or the embedded filesystem broker in
a temporary folder; workers run against the test database and the test's DATA_DIR.
"""

from __future__ import annotations

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
from django.db import connection

from tests.helpers.services import service_missing, services_required
from workers.celery_app import app

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
    if not url and services_required():
        service_missing("the integration workers need CARRY_ON_TEST_BROKER_URL (CI uses Redis)")
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

    def succeeded(self, job: Any, *, timeout: float) -> Any:
        """``job`` (a FineTuningJob) refreshed once it has succeeded; fails, with the
        workers' logs, if it ends otherwise or runs out of time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job.refresh_from_db()
            if job.is_terminal:
                assert job.status == "succeeded", f"{job.error}\n{self.tail()}"
                return job
            time.sleep(0.5)
        raise AssertionError(f"job {job.id} is still {job.status}/{job.stage}\n{self.tail()}")

    def follow(self, client: Any, job_id: str, *, timeout: float, poll: float) -> list[Any]:
        """The job's events (oldest first) once it has succeeded, read through ``client`` (an
        ``openai.OpenAI``); fails, with the workers' logs, if it fails or runs out of time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = list(client.fine_tuning.jobs.list_events(job_id, limit=100))[::-1]
            if any(e.message == "The job has successfully completed" for e in events):
                return events
            job = client.fine_tuning.jobs.retrieve(job_id)
            assert job.status not in ("failed", "cancelled"), f"{job.error}\n{self.tail()}"
            time.sleep(poll)
        raise AssertionError(f"{job_id} did not finish\n{self.tail()}")

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
