"""Serving at scale: many adapters at once, adapter churn, cold loads, a long prompt joining.

Every run goes through ``ServingEngine``'s public API (``submit``, ``events``, ``stats``) or
the ``AdapterCache`` it loads adapters with, so it measures what the service does, chunked
prefill and all. ``serve_bench`` runs these after its batch-1 comparisons.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.common import median, ratio, run_together
from customization.base_model import FrozenBase
from customization.checkpoint import save_adapter, save_carry_on
from customization.config import CarryOnConfig, GenerationConfig, TailConfig
from customization.presets import get_preset
from customization.serving import AdapterCache, AdapterRef, ServingEngine
from customization.training import build_adapter

BASE_NAME = "base"
# The adapters written by the thousand: a one-block carry-on over the last state (small, so
# 10,000 copies fit a temp dir); its size is reported with the figures.
POPULATION_CONFIG = CarryOnConfig(d_model=32, n_blocks=1, n_heads=2, taps=(-1,))


@dataclass
class Stamped:
    """One request's token arrival times (perf_counter seconds)."""

    submitted: float
    stamps: list[float] = field(default_factory=list)  # one per generated token
    first: float | None = None  # the first event, a stop token's included

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.submitted


def run_request(
    engine: ServingEngine,
    prompt: Sequence[int],
    new_tokens: int,
    ref: AdapterRef | None,
    stamped: Stamped | None = None,
) -> Stamped:
    """Submit one greedy request and consume it, noting when each token arrives."""
    config = GenerationConfig(temperature=0.0, max_new_tokens=new_tokens)
    stamped = stamped or Stamped(time.perf_counter())
    stamped.submitted = time.perf_counter()
    completion = engine.submit(BASE_NAME, prompt, config, adapter=ref)
    for event in completion.events():
        now = time.perf_counter()
        stamped.first = stamped.first or now
        if event.token_id is not None:
            stamped.stamps.append(now)
    return stamped


def _rate(results: Sequence[Stamped], seconds: float) -> float:
    return sum(len(r.stamps) for r in results) / seconds if seconds > 0 else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0-100) of ``values``."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def rss_bytes() -> int:
    """This process's resident set now (VmRSS), 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRss:
    """The highest resident set seen while the block runs, sampled every ``interval`` s;
    with ``kv_cache_bytes`` (what the engine's KV caches hold now), also the highest
    resident set beside them (``peak_beside_kv``)."""

    def __init__(self, interval: float = 0.05, kv_cache_bytes: Callable[[], int] | None = None):
        self.interval = interval
        self.kv_cache_bytes = kv_cache_bytes
        self.peak = rss_bytes()
        self.peak_beside_kv = self.peak - self._kv()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _kv(self) -> int:
        return self.kv_cache_bytes() if self.kv_cache_bytes is not None else 0

    def _take(self) -> None:
        rss = rss_bytes()
        self.peak = max(self.peak, rss)
        self.peak_beside_kv = max(self.peak_beside_kv, rss - self._kv())

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._take()


# -- the adapters --------------------------------------------------------------------------


def _moved_off_init(model: torch.nn.Module, seed: int, scale: float) -> None:
    """Every weight moved off its initialisation (a tail's B off zero), as training does."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                noise = torch.randn(parameter.shape, generator=generator) * scale
                parameter.add_(noise.to(parameter.device, parameter.dtype))


def write_mixed_adapters(base: FrozenBase, count: int, work: Path) -> list[AdapterRef]:
    """``count`` trained-like adapters, alternately a default carry-on and a ``balanced``
    tail, saved as artifacts the engine loads."""
    depth = get_preset("balanced").tail_depth(base.num_layers) or 1
    refs = []
    for index in range(count):
        config: CarryOnConfig | TailConfig = (
            CarryOnConfig() if index % 2 == 0 else TailConfig(depth=depth)
        )
        model = build_adapter(base, config, seed=index)
        _moved_off_init(model, seed=index, scale=0.02)
        info = save_adapter(
            model.eval(), work / f"mixed-{index}", base_fingerprints=[base.fingerprint()]
        )
        refs.append(AdapterRef(adapter_id=f"mixed-{index}", path=info.path, sha256=info.sha256))
    return refs


@dataclass(frozen=True)
class Population:
    """Many adapter folders on disk, each its own copy of one small carry-on."""

    refs: list[AdapterRef]
    artifact_bytes: int  # on disk, per adapter
    write_seconds: float


def write_population(base: FrozenBase, count: int, work: Path) -> Population:
    """``count`` adapter folders with distinct ids: one artifact, copied file by file."""
    started = time.perf_counter()
    carry_on = build_adapter(base, POPULATION_CONFIG, seed=0)
    _moved_off_init(carry_on, seed=0, scale=0.02)
    template = save_carry_on(
        carry_on.eval(), work / "template", base_fingerprints=[base.fingerprint()]
    )
    files = [f for f in template.path.iterdir() if f.is_file()]
    refs = []
    for index in range(count):
        folder = work / "population" / f"{index:05d}"
        folder.mkdir(parents=True)
        for file in files:
            shutil.copyfile(file, folder / file.name)
        refs.append(AdapterRef(adapter_id=f"pop-{index}", path=folder, sha256=template.sha256))
    # Flushed to disk before anything is timed: a server's adapters were written long before
    # it loads them. Unflushed, the kernel writing 2.7 GB back on two cores while loads were
    # timed is the likely cause of the tail seen at 10,000 (p99 86 ms, max 618 ms; over
    # 3,000 adapters, 0.8 GB, p99 was 12 ms).
    os.sync()
    return Population(refs, template.nbytes, time.perf_counter() - started)


# -- the runs ------------------------------------------------------------------------------


def concurrency(
    base: FrozenBase,
    prompts: Sequence[Sequence[int]],
    refs: Sequence[AdapterRef],
    counts: Sequence[int],
    new_tokens: int,
    repeats: int,
) -> dict[str, Any]:
    """``count`` requests at once on as many adapters, and on the base alone (the
    ceiling); up to 8, also the same adapter requests one after another."""
    top = max(counts)
    engine = ServingEngine(lambda _: base, max_batch_size=top, max_pending=2 * top)
    try:
        for ref in refs[:top]:
            engine.adapters.get(ref, base)  # the cold load is measured elsewhere

        def requests(count: int, adapters: bool) -> list[Callable[[], Stamped]]:
            return [
                (
                    lambda i=i: run_request(
                        engine, prompts[i % len(prompts)], new_tokens, refs[i] if adapters else None
                    )
                )
                for i in range(count)
            ]

        run_together(requests(min(top, 4), True))  # warm-up
        results: dict[str, Any] = {}
        for count in counts:
            rates: dict[str, list[float]] = {"adapters": [], "base": [], "one_by_one": []}
            for _ in range(repeats):  # round robin, so background load hits each alike
                rates["adapters"].append(_rate(*run_together(requests(count, True))))
                rates["base"].append(_rate(*run_together(requests(count, False))))
                if 1 < count <= 8:
                    started = time.perf_counter()
                    done = [job() for job in requests(count, True)]
                    rates["one_by_one"].append(_rate(done, time.perf_counter() - started))
            together, alone = median(rates["adapters"]), median(rates["base"])
            one_by_one = median(rates["one_by_one"]) if rates["one_by_one"] else None
            results[str(count)] = {
                "adapters_tokens_per_second": together,
                "base_tokens_per_second": alone,
                "one_by_one_tokens_per_second": one_by_one,
                "adapters_vs_base": ratio(together, alone),
                "adapters_vs_one_by_one": ratio(together, one_by_one),
            }
        return results
    finally:
        engine.shutdown()


def churn(
    base: FrozenBase,
    prompts: Sequence[Sequence[int]],
    population: Population,
    *,
    adapters: int,
    cache_entries: int,
    requests: int,
    clients: int,
    new_tokens: int,
    seed: int = 0,
) -> dict[str, Any]:
    """``requests`` spread at random over ``adapters`` adapters with a cache of
    ``cache_entries`` vs the same stream over ``cache_entries`` adapters all cached, from
    ``clients`` concurrent clients; and the process's memory against the cache bound."""
    pool = population.refs[:adapters]
    probe = AdapterCache(max_bytes=1 << 40)
    probe.get(pool[0], base)
    bound = cache_entries * probe.nbytes  # bytes of ``cache_entries`` loaded adapters
    rng = random.Random(seed)
    picks = [rng.randrange(len(pool)) for _ in range(requests)]

    def run(refs: Sequence[AdapterRef], warm: bool) -> dict[str, Any]:
        engine = ServingEngine(
            lambda _: base,
            max_batch_size=clients,
            max_pending=2 * clients,
            adapter_cache_bytes=bound,
        )
        try:
            if warm:
                for ref in refs:
                    engine.adapters.get(ref, base)
            rss_before = rss_bytes()
            queue = list(enumerate(picks))
            lock = threading.Lock()

            def client() -> Stamped:
                total = Stamped(0.0)
                while True:
                    with lock:
                        if not queue:
                            return total
                        index, pick = queue.pop()
                    done = run_request(
                        engine, prompts[index % len(prompts)], new_tokens, refs[pick % len(refs)]
                    )
                    total.stamps.extend(done.stamps)

            def kv_bytes() -> int:
                return sum(engine.stats().kv_cache_bytes.values())

            with PeakRss(kv_cache_bytes=kv_bytes) as peak:
                results, seconds = run_together([client] * clients)
            entries, nbytes, loads, hits = engine.adapters.stats()
        finally:
            engine.shutdown()  # waits for the decode thread to end, as it does when idle
        rss_end = rss_bytes()
        return {
            "tokens_per_second": _rate(results, seconds),
            "adapter_loads": loads - (len(refs) if warm else 0),
            "adapter_hits": hits,
            "cache_entries_at_end": entries,
            "cache_bytes_at_end": nbytes,
            "rss_growth_bytes": rss_end - rss_before,
            "rss_end_bytes": rss_end,
            "rss_peak_bytes": peak.peak,
            "rss_peak_beside_kv_cache_bytes": peak.peak_beside_kv,
        }

    hot = run(pool[:cache_entries], warm=True)  # also brings the allocator to the working set
    cold = run(pool, warm=False)
    return {
        "adapters": len(pool),
        "cache_entries": cache_entries,
        "cache_bound_bytes": bound,
        "requests": requests,
        "clients": clients,
        "all_hot": hot,
        "churn": cold,
        "churn_vs_all_hot": ratio(cold["tokens_per_second"], hot["tokens_per_second"]),
        # What churning through the adapters holds beyond serving the same requests hot:
        # once the engine is idle again, and at the peak while serving.
        "churn_rss_over_all_hot_bytes": cold["rss_end_bytes"] - hot["rss_end_bytes"],
        "churn_peak_over_all_hot_bytes": cold["rss_peak_bytes"] - hot["rss_peak_bytes"],
        # The same peaks less what the KV caches held at each moment: the caches grow with
        # the requests' lengths and with how their joins fall, which differs between the two
        # runs however alike their requests (the engine reports them: kv_cache_bytes).
        "churn_peak_beside_kv_over_all_hot_bytes": (
            cold["rss_peak_beside_kv_cache_bytes"] - hot["rss_peak_beside_kv_cache_bytes"]
        ),
    }


def cold_loads(
    base: FrozenBase, population: Population, loads: int, seed: int = 0
) -> dict[str, Any]:
    """Cache misses on adapters picked at random from the population: the load, the sha256
    and the fingerprint check, as ``AdapterCache.get`` does them on a miss."""
    cache = AdapterCache(max_bytes=0)  # keeps only the newest entry: every get is a miss
    picks = random.Random(seed).sample(population.refs, min(loads, len(population.refs)))
    times = []
    for ref in picks:
        started = time.perf_counter()
        cache.get(ref, base)
        times.append(time.perf_counter() - started)
    return {
        "adapters_on_disk": len(population.refs),
        "artifact_bytes": population.artifact_bytes,
        "write_seconds": population.write_seconds,
        "loads": len(times),
        **{f"p{q}_ms": percentile(times, q) * 1000 for q in (50, 90, 99)},
        "max_ms": max(times) * 1000,
    }


def long_prompt_join(
    base: FrozenBase,
    prompts: Sequence[Sequence[int]],
    refs: Sequence[AdapterRef],
    *,
    prompt_tokens: int,
    running: int,
    new_tokens: int,
    settle: int = 8,
) -> dict[str, Any]:
    """A ``prompt_tokens`` prompt joins a running batch of ``running`` requests: its time to
    first token, and the longest gap between the others' tokens while it joins against
    their usual gap before it."""
    engine = ServingEngine(lambda _: base, max_batch_size=running + 1, max_pending=running + 2)
    limit = base.max_position_embeddings - new_tokens - 1
    long_ids = [t for p in prompts for t in p] * (prompt_tokens // max(1, len(prompts[0])) + 1)
    long_prompt = long_ids[-min(prompt_tokens, limit) :]
    try:
        for ref in refs[:running]:
            engine.adapters.get(ref, base)
        others = [Stamped(0.0) for _ in range(running)]
        threads = [
            threading.Thread(
                target=run_request,
                args=(engine, prompts[i % len(prompts)], new_tokens, refs[i % len(refs)], s),
            )
            for i, s in enumerate(others)
        ]
        for thread in threads:
            thread.start()
        deadline = time.perf_counter() + 600
        while min(len(s.stamps) for s in others) < settle and time.perf_counter() < deadline:
            if not any(thread.is_alive() for thread in threads):
                break
            time.sleep(0.001)
        joined = run_request(engine, long_prompt, 1, None)
        for thread in threads:
            thread.join()
    finally:
        engine.shutdown()
    return {
        "prompt_tokens": len(long_prompt),
        "running": running,
        "ttft_ms": (joined.ttft or 0.0) * 1000,
        **_join_gaps(others, joined),
    }


def _join_gaps(others: Sequence[Stamped], joined: Stamped) -> dict[str, Any]:
    """The others' usual inter-token gap before the join (once all of them were decoding:
    no prefill of theirs in it) and their longest gap across it."""
    start = joined.submitted
    end = joined.first or start
    steady = max((s.stamps[0] for s in others if s.stamps), default=start)
    before: list[float] = []
    across: list[float] = []
    for stamped in others:
        for earlier, later in zip(stamped.stamps, stamped.stamps[1:], strict=False):
            if steady <= earlier and later <= start:
                before.append(later - earlier)
            elif earlier <= end and later > start:  # overlaps the prompt's prefill
                across.append(later - earlier)
    normal = median(before) if before else None
    worst = max(across) if across else None
    typical = median(across) if across else None
    return {
        "normal_step_ms": None if normal is None else normal * 1000,
        "join_gap_ms": None if worst is None else worst * 1000,
        "join_gap_vs_normal_step": ratio(worst, normal),
        # The worst gap is one of hundreds while a long prompt's chunks run; the median
        # says what the others see most of that time.
        "join_gap_median_ms": None if typical is None else typical * 1000,
    }
