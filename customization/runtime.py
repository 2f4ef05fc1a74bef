"""The process runtime of whatever runs models: torch set-up, the device, bases loaded once.

Shared by the web server's serving engine and the Celery workers (through
``webapp.core.runtime``, which reads their settings) and usable as is by scripts. Like the
rest of ``customization`` it reads no settings: thread counts, device preferences and each
base's path and fingerprint come in as arguments. torch and transformers are imported in
function bodies, so importing this module is cheap for a process that never runs a model.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from customization.base_model import FrozenBase

logger = logging.getLogger(__name__)


def set_up_torch(threads: int) -> None:
    """Import torch and transformers and give torch ``threads`` intra-op threads (0: its default).

    Paying the imports up front, when a process starts, keeps the first task from spending
    its first half minute on them.
    """
    import torch
    import transformers  # noqa: F401 - imported for its side effect: paying the import cost

    if threads > 0:
        torch.set_num_threads(threads)


def resolve_device(preference: str) -> str:
    """The device to run on: ``preference`` itself ("cpu", "cuda:1", ...), or for "auto"
    CUDA when this machine has it and the CPU otherwise."""
    if preference != "auto":
        return preference
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class BaseCache:
    """Frozen bases loaded once per process, keyed by (path, device), shared by every caller.

    Loading holds the lock, so threads asking for the same base at once load it once. A base
    registered with a fingerprint is checked against it on every lookup, so files replaced
    under the same path are refused rather than served as the base they no longer are.
    """

    def __init__(self) -> None:
        self._bases: dict[tuple[str, str], FrozenBase] = {}
        self._lock = threading.Lock()

    def get(
        self,
        path: str,
        *,
        name: str,
        device: str,
        revision: str | None = None,
        fingerprint_key: str = "",
    ) -> FrozenBase:
        """The base at ``path`` on ``device``, loading it on first use; raises
        ``IncompatibleBaseModelError`` when its files no longer match ``fingerprint_key``."""
        from customization.base_model import load_base_model
        from customization.errors import IncompatibleBaseModelError

        key = (path, device)
        with self._lock:
            if key not in self._bases:
                logger.info("loading base model %s from %s on %s", name, path, device)
                self._bases[key] = load_base_model(
                    path, name=name, revision=revision or None, device=device
                )
            base = self._bases[key]
        if fingerprint_key and base.fingerprint().key != fingerprint_key:
            raise IncompatibleBaseModelError(
                f"the files of base model {name!r} at {path} no longer match the "
                "fingerprint it was registered with; register it again",
                param="model",
            )
        return base
