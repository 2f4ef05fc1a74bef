"""The process's one serving engine (customization.serving), created on first use.

Bases are looked up by name in the database and loaded once per process through
``webapp.core.runtime.load_base``; carry-ons are cached by (adapter id, sha256).
"""

from __future__ import annotations

import threading
from typing import Any

from django.conf import settings

from webapp.core.runtime import load_base, warm_up
from webapp.customizations.models import BaseModel

_engine: Any = None
_sampler: Any = None
_lock = threading.Lock()


def _load_by_name(name: str) -> Any:
    record = BaseModel.objects.get(name=name)
    return load_base(record)


def get_engine() -> Any:
    """The ``ServingEngine`` of this process (imports torch on first call)."""
    global _engine, _sampler
    with _lock:
        if _engine is None:
            from customization.serving import ServingEngine
            from webapp.serving.metering import EngineSampler

            warm_up()
            options = settings.CARRY_ON
            _engine = ServingEngine(
                _load_by_name,
                max_batch_size=int(options["SERVING_MAX_BATCH"]),
                max_pending=int(options["SERVING_MAX_PENDING"]),
                adapter_cache_bytes=int(options["SERVING_ADAPTER_CACHE_BYTES"]),
                prefill_chunk=int(options["SERVING_PREFILL_CHUNK"]),
            )
            _sampler = EngineSampler(_engine)  # its figures for /metrics
            _sampler.start()
        return _engine


def reset_engine() -> None:
    """Stop and forget the engine (tests; settings changes)."""
    global _engine, _sampler
    with _lock:
        if _sampler is not None:
            _sampler.stop()
        if _engine is not None:
            _engine.shutdown()
        _engine = _sampler = None
