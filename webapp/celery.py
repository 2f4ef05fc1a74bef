"""The Celery application, configured from Django settings (``CELERY_*``), and how the web
side sends a task: by its name, so services never import the worker code.

Workers start it through ``workers.celery_app``, which registers the tasks and the worker's
process hooks.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from celery import Celery

app = Celery("carry_on_studio")
app.config_from_object("django.conf:settings", namespace="CELERY")


def ensure_broker_folders() -> None:
    """The embedded filesystem broker needs its folders before the first message."""
    options = app.conf.broker_transport_options or {}
    for key in ("data_folder_in", "data_folder_out", "control_folder"):
        if options.get(key):
            Path(options[key]).mkdir(parents=True, exist_ok=True)


ensure_broker_folders()


def task_send(name: str, *, args: list[Any]) -> None:
    """Send the task ``name`` (``workers.tasks.train_job``); the routes pick its queue.

    ``send_task`` ignores eager mode (the fast tests'), so there the task module is imported
    and the task run in this process, as ``apply_async`` runs it. A broker that refuses the
    message raises kombu's ``OperationalError`` (or an ``OSError``).
    """
    if app.conf.task_always_eager:
        importlib.import_module(name.rpartition(".")[0])
        app.tasks[name].apply_async(args=args)
    else:
        app.send_task(name, args=args)
