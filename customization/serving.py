"""The serving engine: one frozen base per process, many carry-ons, batched decoding.

Framework-free; the web layer (webapp/serving) is a thin adapter over it.

- Each base is loaded once per process, lazily, by the ``base_loader`` the caller passes.
- Carry-ons live in an LRU cache bounded in bytes and keyed by (adapter id, artifact
  sha256), so a replaced artifact is never served stale and an adapter is servable the
  moment its artifact exists: no restart. Concurrent requests for an adapter that is not
  loaded yet wait for one load (single-flight) instead of each loading it.
- Every base has one decode thread running a ``BatchDecoder``: requests queued for that
  base join the running batch between steps, so concurrent requests, including ones on
  *different* carry-ons, share one base forward per decode step. The thread runs while
  the base has work and ends when it has none, so an idle engine holds no OpenMP workers
  (``runtime.on_own_thread`` says why one pool per process matters).
- Admission is bounded: when ``max_pending`` requests are already waiting or running, a
  new one is refused at once with ``EngineOverloaded`` (the API answers 429) rather than
  piling up; it is checked before an adapter is loaded, so a refused request loads nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from customization.base_model import FrozenBase
from customization.carry_on import CarryOn
from customization.checkpoint import load_adapter
from customization.config import GenerationConfig
from customization.decode_state import DecodeCounters, DecodeSequence, ServedAdapter
from customization.decoder import DEFAULT_PREFILL_CHUNK, BatchDecoder
from customization.errors import CustomizationError, EngineOverloaded
from customization.runtime import (
    freeze_long_lived_objects,
    in_own_mapping,
    release_free_memory,
    unfreeze_objects,
)
from customization.tail import TailAdapter

logger = logging.getLogger(__name__)

BaseLoader = Callable[[str], FrozenBase]


@dataclass(frozen=True)
class AdapterRef:
    """Where an adapter artifact (a carry-on or a tail) is and what it must hash to."""

    adapter_id: str
    path: Path
    sha256: str


class AdapterCache:
    """An LRU of loaded adapters (carry-ons and tails) bounded by their parameter bytes.

    Each time a cache's worth of adapters has been evicted, the memory malloc holds free is
    handed back (``runtime.release_free_memory``), so the process, not only the cache,
    stays within the bound under churn.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, str], tuple[ServedAdapter, int]] = OrderedDict()
        self._sha256_of: dict[str, str] = {}  # adapter id -> its cached entry's sha256
        self._loading: dict[tuple[str, str], Future[ServedAdapter]] = {}
        self._lock = threading.Lock()
        self._nbytes = 0
        self._evicted_bytes = 0  # since the last release of free memory
        self.memory_releases = 0
        self.loads = 0
        self.hits = 0  # gets served without loading (waiting on another's load included)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> tuple[int, int, int, int]:
        """(entries, bytes, loads, hits), taken together."""
        with self._lock:
            return len(self._items), self.nbytes, self.loads, self.hits

    def get(self, ref: AdapterRef, base: FrozenBase) -> ServedAdapter:
        """The loaded adapter; concurrent gets of one not yet loaded share a single load."""
        key = (ref.adapter_id, ref.sha256)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key][0]
            pending = self._loading.get(key)
            if pending is not None:
                self.hits += 1
            else:
                flight: Future[ServedAdapter] = Future()
                self._loading[key] = flight
        if pending is not None:
            return pending.result()  # the loader's error, if it failed, is raised here too
        try:
            loaded, size = self._load(ref, base)
        except BaseException as exc:
            with self._lock:
                del self._loading[key]
            flight.set_exception(exc)
            raise
        with self._lock:
            del self._loading[key]
            self.loads += 1
            self._insert(key, loaded, size)
            release = self._evicted_bytes >= max(self.max_bytes, 1)
            if release:
                self._evicted_bytes = 0
                self.memory_releases += 1
        flight.set_result(loaded)
        if release:
            release_free_memory()
        return loaded

    @staticmethod
    def _load(ref: AdapterRef, base: FrozenBase) -> tuple[ServedAdapter, int]:
        # Outside the lock: loads of other adapters (and hits) go on meanwhile.
        loaded = load_adapter(
            ref.path,
            base_fingerprints=[base.fingerprint()],
            expected_sha256=ref.sha256,
            device=base.device,
        )
        if base.device.type == "cpu":
            loaded = _in_own_mapping(loaded)
        if isinstance(loaded, CarryOn):
            size = sum(p.numel() * p.element_size() for p in loaded.parameters())
        else:
            size = loaded.nbytes()
        return loaded, size

    def _insert(self, key: tuple[str, str], loaded: ServedAdapter, size: int) -> None:
        """Add an entry and evict least recently used ones down to the byte bound (caller
        holds the lock). The newest entry stays even alone over the bound: it is in use."""
        # A new sha256 for the same adapter id replaces the old entry.
        self._drop(key[0])
        self._items[key] = (loaded, size)
        self._sha256_of[key[0]] = key[1]
        self._nbytes += size
        while self._nbytes > self.max_bytes and len(self._items) > 1:
            self._evicted_bytes += self._drop(next(iter(self._items))[0])

    def _drop(self, adapter_id: str) -> int:
        """Remove an adapter's entry, if cached (caller holds the lock), and return its
        bytes; no scan of the LRU, which may hold thousands of small adapters."""
        sha256 = self._sha256_of.pop(adapter_id, None)
        if sha256 is None:
            return 0
        size = self._items.pop((adapter_id, sha256))[1]
        self._nbytes -= size
        return size

    def evict(self, adapter_id: str) -> None:
        with self._lock:
            self._drop(adapter_id)


def _in_own_mapping(adapter: ServedAdapter) -> ServedAdapter:
    """The adapter with its weights moved into a memory mapping of their own
    (``runtime.in_own_mapping``), so evicting it hands its memory back whole."""
    if isinstance(adapter, TailAdapter):
        pairs = list(adapter.weights.items())
        flat = in_own_mapping([t for _, pair in pairs for t in pair])
        weights = {where: (flat[2 * i], flat[2 * i + 1]) for i, (where, _) in enumerate(pairs)}
        return dataclasses.replace(adapter, weights=weights)
    parameters = list(adapter.parameters())
    for parameter, copy in zip(
        parameters, in_own_mapping([p.detach() for p in parameters]), strict=True
    ):
        parameter.data = copy
    return adapter


@dataclass
class Event:
    """One increment of a response: text, or the end (finish_reason set), or an error."""

    index: int  # which choice (n > 1)
    text: str = ""
    token_id: int | None = None
    finish_reason: str | None = None
    error: CustomizationError | None = None


@dataclass
class Completion:
    """A submitted request: iterate it for events; it ends after every choice finished."""

    prompt_tokens: int
    n: int
    _events: queue.Queue[Event] = field(default_factory=queue.Queue)
    _sequences: list[DecodeSequence] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    completion_tokens: int = 0

    def events(self, timeout: float = 300.0) -> Iterator[Event]:
        finished = 0
        while finished < self.n:
            try:
                event = self._events.get(timeout=timeout)
            except queue.Empty:
                self.cancel()
                raise CustomizationError(
                    "the serving engine did not answer in time", code="engine_timeout"
                ) from None
            if event.error is not None:
                raise event.error
            if event.token_id is not None:
                self.completion_tokens += 1
            if event.finish_reason is not None:
                finished += 1
            yield event

    def result(self, timeout: float = 300.0) -> list[tuple[str, str]]:
        """(text, finish_reason) per choice, waiting for the end."""
        return collect_choices(self.events(timeout), self.n)

    def cancel(self) -> None:
        """The client went away: its sequences leave the batch at the next step."""
        self.cancelled.set()


def collect_choices(events: Iterable[Event], n: int) -> list[tuple[str, str]]:
    """(text, finish_reason) per choice, from all of a completion's events."""
    texts = [""] * n
    reasons = [""] * n
    for event in events:
        texts[event.index] += event.text
        if event.finish_reason is not None:
            reasons[event.index] = event.finish_reason
    return list(zip(texts, reasons, strict=True))


class _BaseWorker:
    """The decode loop of one base: admits queued sequences, steps the batch."""

    def __init__(self, base: FrozenBase, max_batch_size: int, prefill_chunk: int):
        self.base = base
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
        self.counters = DecodeCounters()  # survives decoder resets
        self.decoder = self._new_decoder()
        self.waiting: queue.Queue[tuple[DecodeSequence, Completion, int]] = queue.Queue()
        self._owners: dict[int, tuple[Completion, int]] = {}
        self._stop = threading.Event()
        # The decode thread runs while there is work and ends when there is none (see
        # ``_run``); the lock makes "nothing queued, so end" and "queued, so start one"
        # one decision each.
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()

    @property
    def pending(self) -> int:
        # A sequence being prefilled has left the queue but is not in the batch yet; it
        # already has its owner entry, so count owners too (or admission would let more in
        # while a long prompt prefills).
        return max(self.decoder.active, len(self._owners)) + self.waiting.qsize()

    @property
    def decoding(self) -> bool:
        """Whether a decode thread is running now."""
        return self._thread is not None

    def submit(self, sequence: DecodeSequence, completion: Completion, index: int) -> None:
        self.waiting.put((sequence, completion, index))
        with self._thread_lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._run, name=f"decode-{self.base.name}", daemon=True
                )
                self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=timeout)

    def _run(self) -> None:
        """Step the batch until nothing is running or queued, then end.

        A thread per busy spell rather than one for the process's life: the OpenMP workers
        a decode thread makes end with it (``runtime.on_own_thread`` says why that matters),
        so while the engine is idle the process holds none of them, and other work in it
        (a benchmark's peers, for one) runs at full speed. Starting one costs well under a
        millisecond, once per spell. A spell's end also hands the memory its caches and
        activations freed back to the operating system (``runtime.release_free_memory``).
        """
        while not self._stop.is_set():
            if not self.decoder.active and self.waiting.empty():
                release_free_memory()  # under a millisecond; a request queued meanwhile waits it
                with self._thread_lock:
                    if self.waiting.empty():
                        self._thread = None
                        return
                continue
            try:
                self._admit()
                self._drop_cancelled()
                for output in self.decoder.step():
                    self._emit(output.sequence, output.text_delta, output.token_id)
            except Exception as exc:  # a bug or OOM must not kill the loop silently
                logger.exception("decode step failed")
                self._fail_all(exc)

    def _admit(self) -> None:
        while self.decoder.active < self.max_batch_size:
            try:
                sequence, completion, index = self.waiting.get_nowait()
            except queue.Empty:
                return
            if completion.cancelled.is_set():
                continue
            self._owners[id(sequence)] = (completion, index)
            self.decoder.add(sequence)  # prefilled by the next steps, its first token emitted

    def _new_decoder(self) -> BatchDecoder:
        return BatchDecoder(self.base, counters=self.counters, prefill_chunk=self.prefill_chunk)

    def _drop_cancelled(self) -> None:
        # Queued and part-prefilled sequences too: a cancelled request never runs its prefill.
        for sequence in self.decoder.unfinished:
            completion, _ = self._owners[id(sequence)]
            if completion.cancelled.is_set():
                self.decoder.cancel(sequence)
                self._owners.pop(id(sequence), None)

    def _emit(self, sequence: DecodeSequence, text: str, token_id: int | None) -> None:
        owner = self._owners.get(id(sequence))
        if owner is None:
            return
        completion, index = owner
        counted = (
            token_id if token_id is not None and token_id not in sequence.stop_token_ids else None
        )
        completion._events.put(Event(index, text, counted, sequence.finish_reason))
        if sequence.finished:
            self._owners.pop(id(sequence), None)

    def _fail_all(self, exc: Exception) -> None:
        error = CustomizationError(f"generation failed: {exc}", code="server_error")
        for completion, index in list(self._owners.values()):
            completion._events.put(Event(index, error=error))
        self._owners.clear()
        self.decoder = self._new_decoder()


@dataclass(frozen=True)
class EngineStats:
    """What an engine is doing now, per base name, and its adapter cache."""

    batch_size: dict[str, int]  # sequences in the decode batch, those being prefilled included
    waiting: dict[str, int]  # sequences queued for the batch
    counters: dict[str, dict[str, int]]  # DecodeCounters.as_dict() (cumulative)
    kv_cache_bytes: dict[str, int]  # held by the decode batch's KV caches now
    adapters_cached: int
    adapter_cache_bytes: int
    adapter_loads: int  # cumulative
    adapter_hits: int  # cumulative


class ServingEngine:
    """Serves chat requests on lazily loaded bases with cached carry-ons."""

    def __init__(
        self,
        base_loader: BaseLoader,
        *,
        max_batch_size: int = 8,
        max_pending: int = 32,
        adapter_cache_bytes: int = 512 * 1024 * 1024,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ):
        self._base_loader = base_loader
        self.max_batch_size = max_batch_size
        self.prefill_chunk = prefill_chunk
        self.max_pending = max_pending
        self.adapters = AdapterCache(adapter_cache_bytes)
        self._workers: dict[str, _BaseWorker] = {}
        self._lock = threading.Lock()
        self._admission = threading.Lock()

    def base(self, name: str) -> FrozenBase:
        return self._worker(name).base

    def _worker(self, name: str) -> _BaseWorker:
        with self._lock:
            worker = self._workers.get(name)
            if worker is None:
                started = time.perf_counter()
                worker = _BaseWorker(
                    self._base_loader(name), self.max_batch_size, self.prefill_chunk
                )
                self._workers[name] = worker
                # The base's objects live as long as the process: out of the collector's
                # full passes, which otherwise stall a decode step now and then.
                freeze_long_lived_objects()
                logger.info("loaded base %s in %.1f s", name, time.perf_counter() - started)
            return worker

    def counters(self, base_name: str) -> DecodeCounters:
        return self._worker(base_name).counters

    def pending(self) -> int:
        return sum(w.pending for w in self._workers.values())

    def stats(self) -> EngineStats:
        """A snapshot for metrics: read without locks, so a figure may be one step old."""
        with self._lock:
            workers = dict(self._workers)
        entries, nbytes, loads, hits = self.adapters.stats()
        return EngineStats(
            batch_size={name: w.decoder.active for name, w in workers.items()},
            waiting={name: w.waiting.qsize() for name, w in workers.items()},
            counters={name: w.counters.as_dict() for name, w in workers.items()},
            kv_cache_bytes={name: w.decoder.kv_cache_bytes() for name, w in workers.items()},
            adapters_cached=entries,
            adapter_cache_bytes=nbytes,
            adapter_loads=loads,
            adapter_hits=hits,
        )

    def encode_chat(self, base_name: str, messages: Sequence[dict[str, str]]) -> list[int]:
        return self.base(base_name).tokenizer.encode_prompt(messages)

    def submit(
        self,
        base_name: str,
        prompt_ids: Sequence[int],
        config: GenerationConfig,
        *,
        adapter: AdapterRef | None = None,
        n: int = 1,
    ) -> Completion:
        """Queue a request (n choices); raises EngineOverloaded when the queue is full."""
        worker = self._worker(base_name)
        self._check_capacity(n)  # before loading anything for a request we would refuse
        served = self.adapters.get(adapter, worker.base) if adapter is not None else None
        completion = Completion(prompt_tokens=len(prompt_ids), n=n)
        sequences = []
        for index in range(n):
            choice_config = config
            if n > 1 and config.seed is not None:
                # Distinct but reproducible choices.
                choice_config = dataclasses.replace(config, seed=config.seed + index)
            sequences.append(worker.decoder.new_sequence(prompt_ids, choice_config, served))
        with self._admission:
            self._check_capacity(n)
            for index, sequence in enumerate(sequences):
                worker.submit(sequence, completion, index)
        completion._sequences = sequences
        return completion

    def _check_capacity(self, n: int) -> None:
        if self.pending() + n > self.max_pending:
            raise EngineOverloaded(
                f"the server is at capacity ({self.max_pending} requests in flight); retry shortly"
            )

    def shutdown(self) -> None:
        for worker in self._workers.values():
            worker.stop(timeout=5)
        if self._workers:
            unfreeze_objects()
