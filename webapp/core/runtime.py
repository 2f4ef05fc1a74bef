"""The model runtime of a Django process, set from ``settings.CARRY_ON``: torch threads, the
device, and the bases loaded once per process.

The one place the serving engine (web processes) and the Celery workers both get them from,
so that neither imports the other. It lives in ``webapp.core``, the layer every app and the
workers already build on, and holds no torch itself: ``customization.runtime`` does the work
and imports torch only when called, so loading this module (the admin, the UI) stays cheap
and the contract that the web layer imports no torch holds. The device setting is read on
every call; the thread count once, at warm-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from django.conf import settings

from customization.runtime import BaseCache, resolve_device, set_up_torch

if TYPE_CHECKING:
    from customization.base_model import FrozenBase

_bases = BaseCache()
_torch_ready = False


class BaseRecord(Protocol):
    """What loading needs from a registered base (``webapp.customizations.models.BaseModel``)."""

    name: str
    path: str
    revision: str
    fingerprint_key: str


def warm_up() -> None:
    """Import torch and transformers and set the thread count, once per process, before the
    first task needs them, so a heartbeat never goes stale while a task is still importing."""
    global _torch_ready
    if _torch_ready:
        return
    set_up_torch(int(settings.CARRY_ON["TORCH_THREADS"]))
    _torch_ready = True


def device() -> str:
    """The device this process runs models on (``CARRY_ON["DEVICE"]``, "auto" resolved)."""
    return resolve_device(str(settings.CARRY_ON["DEVICE"]))


def load_base(record: BaseRecord) -> FrozenBase:
    """The record's FrozenBase, loaded once per process and checked against its fingerprint."""
    warm_up()
    return _bases.get(
        record.path,
        name=record.name,
        device=device(),
        revision=record.revision or None,
        fingerprint_key=record.fingerprint_key,
    )
