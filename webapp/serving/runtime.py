"""The torch side of the Django processes: threads, device, and base models loaded once.

Shared by the serving engine (web processes) and the Celery workers. torch and
transformers are imported lazily, in function bodies, so importing this module is cheap.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from django.conf import settings

from webapp.customizations.models import BaseModel

logger = logging.getLogger(__name__)

_bases: dict[tuple[str, str], Any] = {}
_bases_lock = threading.Lock()
_torch_ready = False


def warm_up() -> None:
    """Import torch and transformers and set threads once, before the first task needs them,
    so a heartbeat never goes stale while a task is still importing."""
    global _torch_ready
    if _torch_ready:
        return
    import torch
    import transformers  # noqa: F401 - imported for its side effect: paying the import cost

    threads = int(settings.CARRY_ON["TORCH_THREADS"])
    if threads > 0:
        torch.set_num_threads(threads)
    _torch_ready = True


def device() -> str:
    wanted = str(settings.CARRY_ON["DEVICE"])
    if wanted != "auto":
        return wanted
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_base(record: BaseModel) -> Any:
    """The record's FrozenBase, loaded once per process and checked against its fingerprint."""
    from customization.base_model import load_base_model
    from customization.errors import IncompatibleBaseModelError

    warm_up()
    key = (record.path, device())
    with _bases_lock:
        if key not in _bases:
            logger.info("loading base model %s from %s on %s", record.name, record.path, key[1])
            base = load_base_model(
                record.path, name=record.name, revision=record.revision or None, device=key[1]
            )
            _bases[key] = base
        base = _bases[key]
    if record.fingerprint_key and base.fingerprint().key != record.fingerprint_key:
        raise IncompatibleBaseModelError(
            f"the files of base model {record.name!r} at {record.path} no longer match the "
            "fingerprint it was registered with; register it again",
            param="model",
        )
    return base
