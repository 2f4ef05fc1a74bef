"""Run the whole service with one command: database, base model, admin, workers, web server.

With no settings it is self-contained (SQLite and the filesystem broker under the data
directory); with DATABASE_URL and CELERY_BROKER_URL it runs on PostgreSQL and
Redis/RabbitMQ instead. Ctrl-C stops the workers and the server it started.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser

from webapp.accounts.models import User
from webapp.accounts.services import user_create
from webapp.customizations.management.commands._base_models import register_bundled
from webapp.customizations.models import BaseModel

# Two workers, as an inference node and a training node would be: extraction (and the
# small bookkeeping tasks) on one, training on the other, so a long training run never
# holds up validating or extracting the next job.
WORKERS = (("embed", "default,embed"), ("train", "train"))


class Command(BaseCommand):
    help = (
        "Migrate, register the bundled base, create an admin, then start the Celery workers "
        "and the web server."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--addr",
            default=os.environ.get("CARRY_ON_ADDR", "127.0.0.1:8000"),
            help="host:port the web server listens on (default 127.0.0.1:8000)",
        )
        parser.add_argument("--no-worker", action="store_true", help="start no Celery worker")
        parser.add_argument(
            "--setup-only", action="store_true", help="prepare everything, start nothing"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        Path(settings.DATA_DIR).mkdir(parents=True, exist_ok=True)
        call_command("migrate", interactive=False, verbosity=0)
        self._ensure_base()
        self._ensure_admin()
        if options["setup_only"]:
            return
        self._metrics_folder()
        children: list[tuple[str, subprocess.Popen[bytes]]] = []
        if not options["no_worker"]:
            for name, queues in WORKERS:
                children.append((f"worker:{name}", self._start_worker(name, queues)))
        children.append(("web", self._start_web(options["addr"])))
        url = f"http://{options['addr']}/"
        self.stdout.write(self.style.SUCCESS(f"Carry-On Studio is running at {url}"))
        self.stdout.write(f"  admin: {url}admin/   (Ctrl-C stops everything)")
        self._supervise(children)

    def _ensure_base(self) -> None:
        if not settings.CARRY_ON["BUNDLED_BASE"]:
            return
        from customization.base_model import BUNDLED_NAME

        if BaseModel.objects.filter(name=BUNDLED_NAME).exists():
            return
        from customization.errors import CustomizationError

        self.stdout.write("Registering the bundled base model (converted once) ...")
        has_default = BaseModel.objects.filter(is_default=True).exists()
        try:
            base = register_bundled(default=not has_default)
        except CustomizationError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(f"Registered base model {base.name}")

    def _ensure_admin(self) -> None:
        if User.objects.filter(is_superuser=True).exists():
            return
        username = "admin" if not User.objects.filter(username="admin").exists() else "studio-admin"
        password = secrets.token_urlsafe(12)
        user_create(username=username, password=password, is_staff=True, is_superuser=True)
        self.stdout.write(self.style.WARNING("Created an admin account (shown only this once):"))
        self.stdout.write(f"  username: {username}\n  password: {password}")

    def _metrics_folder(self) -> None:
        """One PROMETHEUS_MULTIPROC_DIR for the web server and the workers, so /metrics
        shows all of them; emptied at each start, as prometheus_client asks."""
        folder = Path(
            os.environ.get("PROMETHEUS_MULTIPROC_DIR") or Path(settings.DATA_DIR) / "metrics"
        )
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):
            stale.unlink()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)  # inherited by the children

    def _start_worker(self, name: str, queues: str) -> subprocess.Popen[bytes]:
        command = [
            sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
            "-Q", queues, "-n", f"{name}@%h", "--pool=prefork", "--concurrency=1",
            "--loglevel=INFO", "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        return subprocess.Popen(command, cwd=settings.BASE_DIR, start_new_session=True)

    def _start_web(self, addr: str) -> subprocess.Popen[bytes]:
        command = [sys.executable, "manage.py", "runserver", "--noreload", addr]
        return subprocess.Popen(
            command,
            cwd=settings.BASE_DIR,
            start_new_session=True,
            # SIGINT is how it is stopped (_interrupt_web): never inherit it ignored, as a
            # command started in the background of a shell would.
            preexec_fn=_default_sigint,
        )

    def _supervise(self, children: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
        stopping = {"flag": False}

        def stop(signum: int, _frame: Any) -> None:
            stopping["flag"] = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        failed = None
        while not stopping["flag"]:
            for name, child in children:
                if child.poll() is not None:
                    failed = f"{name} exited with status {child.returncode}"
                    stopping["flag"] = True
            time.sleep(0.5)
        self.stdout.write("Stopping ...")
        _interrupt_web(children)
        _terminate([child for _, child in children])
        if failed:
            raise CommandError(failed)
        self.stdout.write("Stopped.")


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt_web(
    children: list[tuple[str, subprocess.Popen[bytes]]], grace: float = 10.0
) -> None:
    """runserver exits through its normal shutdown on SIGINT (on SIGTERM it just dies), so
    what it still buffers (usage records) is written first."""
    web = [child for name, child in children if name == "web" and child.poll() is None]
    for child in web:
        child.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(child.poll() is None for child in web):
        time.sleep(0.2)


def _terminate(children: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM (a worker finishes its task), SIGQUIT (cold shutdown), then SIGKILL the group.

    A job interrupted by the last two is resumed later from its newest checkpoint.
    """
    steps = (
        (signal.SIGTERM, 10.0, False),
        (signal.SIGQUIT, 5.0, False),
        (signal.SIGKILL, 5.0, True),
    )
    for sig, grace, whole_group in steps:
        alive = [child for child in children if child.poll() is None]
        if not alive:
            return
        for child in alive:
            with contextlib.suppress(ProcessLookupError):
                if whole_group:
                    os.killpg(child.pid, sig)
                else:
                    child.send_signal(sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(c.poll() is None for c in alive):
            time.sleep(0.2)
