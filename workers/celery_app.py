"""The worker's entry point (``celery -A workers.celery_app worker``): the web side's Celery
application (webapp/celery.py) with the tasks registered and the worker's process hooks."""

import os
from typing import Any

from celery.signals import worker_process_init, worker_ready, worker_shutdown

# Like webapp/wsgi.py: a worker started without settings runs on the production ones (and
# refuses to start without a secret key), never on the local ones with DEBUG on.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings.production")

from webapp.celery import app

app.autodiscover_tasks(["workers"])


@worker_process_init.connect
def _on_process_init(**_: Any) -> None:
    from webapp.core.runtime import warm_up

    warm_up()


@worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    # Jobs whose worker died (killed, machine lost) are resumed from here: the filesystem
    # broker never redelivers, and Redis only after its visibility timeout.
    from webapp.core.runtime import warm_up
    from workers.runtime import start_sweeper

    pool = getattr(sender, "pool", None)
    if pool is not None and type(pool).__module__.endswith(".solo"):
        warm_up()  # a solo worker runs tasks in this very process (prefork: in its children)
    start_sweeper()


@worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    from workers.runtime import stop_sweeper

    stop_sweeper()
