"""The Celery application, configured from Django settings (``CELERY_*``)."""

import os
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_ready, worker_shutdown

# Like webapp/wsgi.py: a worker started without settings runs on the production ones (and
# refuses to start without a secret key), never on the local ones with DEBUG on.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings.production")

app = Celery("carry_on_studio")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["workers"])


def ensure_broker_folders() -> None:
    """The embedded filesystem broker needs its folders before the first message."""
    options = app.conf.broker_transport_options or {}
    for key in ("data_folder_in", "data_folder_out", "control_folder"):
        if options.get(key):
            Path(options[key]).mkdir(parents=True, exist_ok=True)


ensure_broker_folders()


@worker_process_init.connect
def _on_process_init(**_: Any) -> None:
    from workers.runtime import warm_up

    warm_up()


@worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    # Jobs whose worker died (killed, machine lost) are resumed from here: the filesystem
    # broker never redelivers, and Redis only after its visibility timeout.
    from workers.runtime import start_sweeper, warm_up

    pool = getattr(sender, "pool", None)
    if pool is not None and type(pool).__module__.endswith(".solo"):
        warm_up()  # a solo worker runs tasks in this very process (prefork: in its children)
    start_sweeper()


@worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    from workers.runtime import stop_sweeper

    stop_sweeper()
