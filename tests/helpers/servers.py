"""Real server processes for fault and load tests: gunicorn on loopback, and a TCP proxy.

Loaded as a pytest plugin by tests/conftest.py (fixture ``studio_server``). The server runs
the whole Django app in its own processes against the test database and the test's
DATA_DIR, like the Celery workers of tests/helpers/celery_workers.py. Traffic stays on
127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from django.conf import settings

from tests.helpers.celery_workers import REPO, _database_url


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_healthy(
    url: str,
    proc: subprocess.Popen[bytes],
    log: Callable[[], str],
    *,
    what: str,
    timeout: float = 120,
    poll: float = 0.2,
) -> None:
    """Wait until ``url``/healthz answers 200; fail with ``log()`` if ``proc`` exits first or
    it does not answer within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited:\n{log()}")
        try:
            if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(poll)
    raise AssertionError(f"{what} did not start:\n{log()}")


class StudioServer:
    """``gunicorn webapp.wsgi`` (gthread workers) on a free loopback port."""

    def __init__(self, env: dict[str, str], log: Path, *, workers: int = 2, threads: int = 8):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [
            sys.executable, "-m", "gunicorn", "webapp.wsgi:application",
            "--bind", f"127.0.0.1:{self.port}", "--workers", str(workers),
            "--worker-class", "gthread", "--threads", str(threads),
            "--timeout", "120", "--graceful-timeout", "5", "--access-logfile", "-",
        ]  # fmt: skip
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120) -> None:
        wait_healthy(self.url, self.proc, self.tail, what="the server", timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def tail(self, lines: int = 60) -> str:
        text = self.log.read_text("utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])


@pytest.fixture
def studio_server(data_dir: Path, tmp_path: Path) -> Iterator[Callable[..., StudioServer]]:
    """Start servers with ``studio_server(**env)``; all are stopped after the test."""
    started: list[StudioServer] = []

    def start(*, workers: int = 2, threads: int = 8, **extra_env: str) -> StudioServer:
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "webapp.settings.test",
            "DATABASE_URL": _database_url(),
            "CARRY_ON_DATA_DIR": str(data_dir),
            "CARRY_ON_MODELS_DIR": str(settings.MODELS_DIR),
            "CARRY_ON_TORCH_THREADS": "1",
            "CELERY_TASK_ALWAYS_EAGER": "0",
            **extra_env,
        }
        logs = tmp_path / "logs"
        logs.mkdir(exist_ok=True)
        server = StudioServer(
            env, logs / f"server-{len(started)}.log", workers=workers, threads=threads
        )
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target; ``down()`` refuses and cuts every connection,
    as a broker that crashed would, and ``up()`` brings it back on the same port."""

    def __init__(self, target_host: str, target_port: int):
        self.target = (target_host, target_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.up()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.2)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            listener.close()
        for conn in conns:
            _close(conn)

    def _accept(self, listener: socket.socket) -> None:
        while self._listener is listener:
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        source.settimeout(None)
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        _close(source)
        _close(sink)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
