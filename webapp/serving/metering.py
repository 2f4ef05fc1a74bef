"""What each chat costs and how the engine is doing, recorded off the decode path.

A ``ChatMeter`` follows one chat completion from its arrival: the first token, then its
end (every choice finished, an error, the client gone). At the end it counts the chat in
the Prometheus figures and queues its usage record (webapp/usage: written in batches by a
background thread). The request's own thread does this, and nothing here waits on the
database: the decode loop is never held up by it.

``EngineSampler`` copies the engine's state (batch size, queue, adapter cache) into gauges
once a second from its own thread, so the decode loop is never instrumented.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from django.conf import settings
from django.utils import timezone

from webapp.metrics import instruments
from webapp.usage.services import UsageEntry, usage_record

logger = logging.getLogger(__name__)


class ChatMeter:
    """Times one chat and, once it ends, counts it and records its usage (exactly once)."""

    def __init__(
        self, *, user_id: int, api_key_id: int | None, model: str, base: str, adapter: str | None
    ):
        self.user_id, self.api_key_id = user_id, api_key_id
        self.model, self.base, self.adapter = model, base, adapter
        self.created_at = timezone.now()
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.finish_reasons: list[str] = []
        self._ended = False
        self._lock = threading.Lock()

    def admitted(self) -> None:
        """The engine took the chat: it is in flight until ``end``."""
        instruments.chats_in_flight.labels(self.base).inc()

    def token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()

    def finished(self, reason: str) -> None:
        self.finish_reasons.append(reason)

    def end(self, outcome: str, *, prompt_tokens: int, completion_tokens: int) -> None:
        """The chat is over: count it and queue its usage record. Never raises."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
        try:
            instruments.chats_in_flight.labels(self.base).dec()
            self._count(outcome, prompt_tokens, completion_tokens)
            usage_record(entry=self._entry(outcome, prompt_tokens, completion_tokens))
        except Exception:  # runs from finalizers too: a metrics bug must not break a chat
            logger.exception("recording a chat's usage failed")

    def refused(self, status: int) -> None:
        """Refused before decoding: a 4xx is counted only; a 5xx is also the user's record
        (the adapter could not be served)."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
        outcome = "error" if status >= 500 else "refused"
        try:
            self._count(outcome, 0, 0)
            if outcome == "error":
                usage_record(entry=self._entry(outcome, 0, 0))
        except Exception:
            logger.exception("recording a refused chat failed")

    def _count(self, outcome: str, prompt_tokens: int, completion_tokens: int) -> None:
        now = time.monotonic()
        instruments.chat_requests.labels(self.base, outcome).inc()
        instruments.chat_duration.labels(self.base).observe(now - self.started)
        if self.first_token_at is not None:
            instruments.chat_ttft.labels(self.base).observe(self.first_token_at - self.started)
        instruments.prompt_tokens.labels(self.base).inc(prompt_tokens)
        instruments.generated_tokens.labels(self.base).inc(completion_tokens)

    def _entry(self, outcome: str, prompt_tokens: int, completion_tokens: int) -> UsageEntry:
        ttft = None if self.first_token_at is None else self.first_token_at - self.started
        return UsageEntry(
            user_id=self.user_id,
            api_key_id=self.api_key_id,
            model=self.model,
            adapter_name=self.adapter,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            time_to_first_token=ttft,
            duration=time.monotonic() - self.started,
            outcome=outcome,
            created_at=self.created_at,
        )


def chat_outcome(finish_reasons: list[str]) -> str:
    """A chat whose choices all ended is a "length" if any ran out of tokens."""
    return "length" if "length" in finish_reasons else "stop"


class EngineSampler(threading.Thread):
    """Copies an engine's state into the Prometheus gauges every METRICS_SAMPLE_SECONDS."""

    def __init__(self, engine: Any):
        super().__init__(name="engine-metrics", daemon=True)
        self.engine = engine
        self.stopped = threading.Event()
        self._seen: dict[str, int] = {}  # cumulative values already counted

    def run(self) -> None:
        interval = float(settings.CARRY_ON["METRICS_SAMPLE_SECONDS"])
        while not self.stopped.wait(interval):
            try:
                self.sample()
            except Exception:
                logger.warning("sampling the serving engine failed", exc_info=True)

    def _add(self, key: str, total: int, counter: Any) -> None:
        """Count what a cumulative engine figure grew by since the last sample."""
        grown = total - self._seen.get(key, 0)
        if grown > 0:
            counter.inc(grown)
        self._seen[key] = total

    def sample(self) -> None:
        stats = self.engine.stats()
        for base, size in stats.batch_size.items():
            instruments.engine_batch_size.labels(base).set(size)
            instruments.engine_queue_depth.labels(base).set(stats.waiting.get(base, 0))
            kv_bytes = stats.kv_cache_bytes.get(base, 0)
            instruments.engine_kv_cache_bytes.labels(base).set(kv_bytes)
            counters = stats.counters.get(base, {})
            steps = instruments.engine_decode_steps.labels(base)
            self._add(f"steps:{base}", counters.get("decode_steps", 0), steps)
            rows = instruments.engine_decode_rows.labels(base)
            self._add(f"rows:{base}", counters.get("decode_rows", 0), rows)
        instruments.adapter_cache_entries.set(stats.adapters_cached)
        instruments.adapter_cache_bytes.set(stats.adapter_cache_bytes)
        self._add("loads", stats.adapter_loads, instruments.adapter_cache_loads)
        self._add("hits", stats.adapter_hits, instruments.adapter_cache_hits)

    def stop(self) -> None:
        self.stopped.set()
