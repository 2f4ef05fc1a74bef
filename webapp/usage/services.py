"""Usage records are written in batches, never on the chat's path.

``usage_record`` only appends to this process's buffer (a lock held for an append). A
background thread writes the buffer with one ``bulk_create`` when it holds
``USAGE_BATCH_SIZE`` records or every ``USAGE_FLUSH_SECONDS``; the rest is written at exit
(``atexit``: gunicorn's and runserver's normal shutdowns, Ctrl-C). While the database is
unreachable records wait in the buffer (up to ``USAGE_MAX_BUFFERED``, then the oldest are
dropped and counted in ``carry_on_usage_records_dropped_total``); a kill -9 loses at most
the last interval's records.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import logging
import os
import threading
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connections, transaction
from django.db.models import QuerySet

from webapp.metrics import instruments
from webapp.usage.models import UsageRecord

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class UsageEntry:
    """A finished chat, as the serving layer reports it (ids, not rows: no queries)."""

    user_id: int
    api_key_id: int | None
    model: str
    adapter_name: str | None  # the Adapter's model name; None for a base or a checkpoint
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token: float | None
    duration: float
    outcome: str
    created_at: datetime.datetime


def _existing(rows: QuerySet[Any], field: str, values: set[Any]) -> dict[Any, Any]:
    """{value of ``field``: pk} for the rows that exist."""
    if not values:
        return {}
    return dict(rows.filter(**{f"{field}__in": values}).values_list(field, "pk"))


def _usage_rows(entries: list[UsageEntry]) -> list[UsageRecord]:
    """Rows for the entries whose user still exists; a deleted key or adapter reads None."""
    from webapp.accounts.models import ApiKey, User
    from webapp.customizations.models import Adapter

    users = _existing(User.objects.all(), "pk", {e.user_id for e in entries})
    keys = _existing(ApiKey.objects.all(), "pk", {e.api_key_id for e in entries if e.api_key_id})
    names = {e.adapter_name for e in entries if e.adapter_name}
    adapters = _existing(Adapter.objects.all(), "name", names)
    return [
        UsageRecord(
            user_id=entry.user_id,
            api_key_id=entry.api_key_id if entry.api_key_id in keys else None,
            model=entry.model[:512],
            adapter_id=adapters.get(entry.adapter_name),
            prompt_tokens=entry.prompt_tokens,
            completion_tokens=entry.completion_tokens,
            time_to_first_token=entry.time_to_first_token,
            duration=entry.duration,
            outcome=entry.outcome,
            created_at=entry.created_at,
        )
        for entry in entries
        if entry.user_id in users
    ]


def usage_write(*, entries: list[UsageEntry]) -> int:
    """Write entries now: one bulk insert, or row by row when a reference vanished in
    between (a user, key or adapter deleted by another process). Returns rows written."""
    rows = _usage_rows(entries)
    try:
        with transaction.atomic():
            UsageRecord.objects.bulk_create(rows)
        written = len(rows)
    except IntegrityError:
        written = 0
        for row in _usage_rows(entries):
            try:
                with transaction.atomic():
                    row.save(force_insert=True)
                written += 1
            except IntegrityError:
                row.api_key_id = row.adapter_id = None
                try:
                    with transaction.atomic():
                        row.save(force_insert=True)
                    written += 1
                except IntegrityError:  # the user is gone: nobody to bill
                    pass
    instruments.usage_written.inc(written)
    instruments.usage_dropped.inc(len(entries) - written)
    return written


class UsageBuffer:
    """This process's records waiting to be written, and the thread that writes them."""

    def __init__(self) -> None:
        self._entries: list[UsageEntry] = []
        self._lock = threading.Lock()  # guards _entries: held only to append or swap
        self._writing = threading.Lock()  # one batch write at a time
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def add(self, entry: UsageEntry) -> None:
        options = settings.CARRY_ON
        with self._lock:
            self._entries.append(entry)
            overflow = len(self._entries) - int(options["USAGE_MAX_BUFFERED"])
            if overflow > 0:
                del self._entries[:overflow]
                instruments.usage_dropped.inc(overflow)
            full = len(self._entries) >= int(options["USAGE_BATCH_SIZE"])
            instruments.usage_buffered.set(len(self._entries))
            self._start()
        if full:
            self._wake.set()

    def _start(self) -> None:
        """The writer thread, once per process (again in a forked child: threads do not
        survive a fork). Called with the lock held."""
        if self._thread is not None and self._pid == os.getpid():
            return
        if self._pid == 0:
            atexit.register(self._flush_at_exit)
        self._pid = os.getpid()
        self._writing = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait(timeout=float(settings.CARRY_ON["USAGE_FLUSH_SECONDS"]))
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # kept in the buffer; the next round tries again
                logger.warning("usage records not written yet", exc_info=True)
            finally:
                # No connection held between rounds (a database restart, test teardown).
                connections.close_all()

    def flush(self) -> int:
        """Write everything buffered so far; on failure it goes back into the buffer."""
        with self._writing:
            with self._lock:
                batch, self._entries = self._entries, []
            if not batch:
                return 0
            try:
                return usage_write(entries=batch)
            except BaseException:
                with self._lock:
                    self._entries[:0] = batch
                raise
            finally:
                with self._lock:
                    instruments.usage_buffered.set(len(self._entries))

    def _flush_at_exit(self) -> None:
        try:
            written = self.flush()
        except Exception:
            logger.exception("usage records lost at exit: %d", len(self._entries))
        else:
            if written:
                logger.info("usage: wrote %d buffered record(s) at exit", written)

    def discard(self) -> None:
        """Forget what is buffered (tests)."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


usage_buffer = UsageBuffer()


def usage_record(*, entry: UsageEntry) -> None:
    """Queue a finished chat's record; returns at once (no database access)."""
    usage_buffer.add(entry)


def usage_flush() -> int:
    """Write this process's buffered records now (shutdown, tests)."""
    return usage_buffer.flush()
