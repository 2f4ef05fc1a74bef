"""The serving engine: shared base forwards, adapter cache, admission control."""

from __future__ import annotations

import gc
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from customization.checkpoint import (
    CONFIG_FILE,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    TAIL_FILE,
    WEIGHTS_FILE,
    load_carry_on,
    save_adapter,
    save_carry_on,
)
from customization.config import CarryOnConfig, GenerationConfig, TailConfig
from customization.errors import ArtifactError, EngineOverloaded, IncompatibleBaseModelError
from customization.generation import generate
from customization.serving import AdapterCache, AdapterRef, ServingEngine
from customization.training import build_adapter, build_carry_on
from tests.helpers.tiny_models import tiny_base

GREEDY = GenerationConfig(temperature=0.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def base():
    return tiny_base(seed=3)


def _trained_like(base, seed: int):
    """A carry-on with non-zero weights, so it changes the base's output."""
    carry_on = build_carry_on(
        CarryOnConfig(d_model=16, n_heads=2, taps=(-1, 1), tap_mode="ladder"),
        width=base.hidden_size,
        seed=seed,
    )
    with torch.no_grad():
        for parameter in carry_on.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    return carry_on.eval()


def _saved(base, tmp_path: Path, name: str, seed: int) -> AdapterRef:
    info = save_carry_on(
        _trained_like(base, seed), tmp_path / name, base_fingerprints=[base.fingerprint()]
    )
    return AdapterRef(adapter_id=name, path=info.path, sha256=info.sha256)


def _engine(base, **kwargs) -> ServingEngine:
    return ServingEngine(lambda name: base, **kwargs)


def _prompt(base, text: str) -> list[int]:
    return base.tokenizer.encode_prompt([{"role": "user", "content": text}])


def test_engine_output_equals_direct_generation(base, tmp_path):
    """A request through the engine yields what generate() gives for the same adapter."""
    engine = _engine(base)
    ref = _saved(base, tmp_path, "a", seed=1)
    prompt = _prompt(base, "what is 2+2?")
    [(text, reason)] = engine.submit("tiny", prompt, GREEDY, adapter=ref).result(timeout=30)
    direct = generate(base, prompt, GREEDY, engine.adapters.get(ref, base))
    assert (text, reason) == (direct.text, direct.finish_reason)
    engine.shutdown()


def test_concurrent_requests_on_different_adapters_share_base_forwards(base, tmp_path):
    """Two concurrent requests on two adapters run one base forward per step, same outputs."""
    engine = _engine(base)
    refs = [_saved(base, tmp_path, "a", seed=1), _saved(base, tmp_path, "b", seed=2)]
    prompts = [_prompt(base, "hello"), _prompt(base, "a longer question here?")]
    config = GenerationConfig(temperature=0.0, max_new_tokens=20)
    alone = [
        generate(base, p, config, engine.adapters.get(r, base)).text
        for p, r in zip(prompts, refs, strict=True)
    ]
    barrier = threading.Barrier(2)
    results: list[str] = ["", ""]

    def run(i: int) -> None:
        barrier.wait()
        completion = engine.submit("tiny", prompts[i], config, adapter=refs[i])
        results[i] = "".join(event.text for event in completion.events(timeout=30))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counters = engine.counters("tiny")
    assert results == alone
    assert counters.decode_rows > counters.decode_steps  # some steps served both requests
    engine.shutdown()


def _idles(worker) -> bool:
    """Whether ``worker``'s decode thread ends within five seconds (it notices it is idle
    right after the last event)."""
    for _ in range(500):
        thread = worker._thread
        if thread is None:
            return True
        thread.join(timeout=0.01)
    return False


def test_the_decode_thread_ends_when_idle_and_the_next_request_starts_one(base):
    """An idle engine runs no decode thread (so holds no OpenMP workers); a request after
    the idle spell is served as the first was."""
    engine = _engine(base)
    prompt = _prompt(base, "what is 2+2?")
    first = engine.submit("tiny", prompt, GREEDY).result(timeout=30)
    worker = engine._workers["tiny"]
    assert _idles(worker)
    assert not [t for t in threading.enumerate() if t.name == f"decode-{base.name}"]
    assert engine.submit("tiny", prompt, GREEDY).result(timeout=30) == first
    assert _idles(worker)
    engine.shutdown()


def test_a_loaded_base_is_kept_out_of_the_collectors_full_passes(base):
    """Once an engine has its base, the objects alive then (the base's modules, parameters
    and tokenizer among them) are frozen out of the cyclic collector, whose full passes
    over them stalled decode steps; shutdown gives them back."""
    engine = _engine(base)
    engine.submit("tiny", _prompt(base, "hi"), GREEDY).result(timeout=30)
    frozen = gc.get_freeze_count()
    assert frozen > 0
    tracked = {id(o) for o in gc.get_objects()}  # only the collector's generations
    assert id(base.model) not in tracked
    engine.shutdown()
    assert gc.get_freeze_count() == 0
    assert any(o is base.model for o in gc.get_objects())


def test_full_queue_is_refused_with_engine_overloaded(base):
    """Beyond max_pending, a request is refused at once instead of piling up."""
    engine = _engine(base, max_pending=2)
    long = GenerationConfig(temperature=0.0, max_new_tokens=200)
    first = engine.submit("tiny", _prompt(base, "one"), long, n=2)
    with pytest.raises(EngineOverloaded):
        engine.submit("tiny", _prompt(base, "two"), long)
    first.cancel()
    engine.shutdown()


def test_replaced_artifact_is_not_served_stale(base, tmp_path):
    """A new sha256 for the same adapter id loads the new weights."""
    cache = AdapterCache(max_bytes=1 << 30)
    old = _saved(base, tmp_path, "a", seed=1)
    first = cache.get(old, base)
    new = _saved(base, tmp_path, "a", seed=2)  # same folder, new weights
    second = cache.get(new, base)
    assert old.sha256 != new.sha256
    assert not torch.equal(first.up.weight, second.up.weight)
    assert len(cache) == 1


def test_cache_refuses_artifact_whose_sha256_changed_on_disk(base, tmp_path):
    """A recorded sha256 that no longer matches the files is refused at load."""
    ref = _saved(base, tmp_path, "a", seed=1)
    with (ref.path / "carry_on.safetensors").open("r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactError):
        AdapterCache(max_bytes=1 << 30).get(ref, base)


def test_cache_evicts_least_recently_used_beyond_its_byte_bound(base, tmp_path):
    """The adapter LRU stays within its byte budget, dropping the oldest first."""
    refs = [_saved(base, tmp_path, name, seed=i) for i, name in enumerate("abc")]
    one = AdapterCache(max_bytes=1 << 30)
    size = sum(p.numel() * p.element_size() for p in one.get(refs[0], base).parameters())
    cache = AdapterCache(max_bytes=2 * size)
    for ref in refs:
        cache.get(ref, base)
    assert len(cache) == 2
    assert cache.nbytes <= 2 * size
    cache.get(refs[0], base)  # was evicted: loads again
    assert cache.loads == 4


def test_cache_hands_memory_back_after_each_cache_worth_of_evictions(base, tmp_path):
    """Under churn the cache releases what malloc holds free once a whole cache's worth of
    adapters has been evicted (not on every eviction: walking the heap takes time)."""
    refs = [_saved(base, tmp_path, name, seed=i) for i, name in enumerate("abcdef")]
    one = AdapterCache(max_bytes=1 << 30)
    size = sum(p.numel() * p.element_size() for p in one.get(refs[0], base).parameters())
    cache = AdapterCache(max_bytes=2 * size)
    releases = []
    for ref in refs:
        cache.get(ref, base)
        releases.append(cache.memory_releases)
    # Loads 3 and 4 evict one adapter each: the cache's worth (2) is reached at load 4;
    # loads 5 and 6 evict two more: the second release.
    assert releases == [0, 0, 0, 1, 1, 2]


def _mappings() -> list[tuple[int, int]]:
    """This process's memory mappings (start, end), from /proc/self/maps."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        start, end = line.split()[0].split("-")
        ranges.append((int(start, 16), int(end, 16)))
    return ranges


def test_a_cached_adapter_lives_in_a_mapping_of_its_own_handed_back_when_evicted(base, tmp_path):
    """A loaded carry-on's parameters and a tail's LoRA weights each lie in one anonymous
    mapping of their own (not among the heap's short-lived buffers), hold what the files
    hold, and serve as before; once the cache drops the adapter the mapping is gone."""
    carry_on = _saved(base, tmp_path, "carry-on", seed=1)
    tail_model = build_adapter(base, TailConfig(depth=1, rank=4), seed=2)
    with torch.no_grad():
        for parameter in tail_model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.05)
    info = save_adapter(tail_model, tmp_path / "tail", base_fingerprints=[base.fingerprint()])
    tail = AdapterRef(adapter_id="tail", path=info.path, sha256=info.sha256)
    cache = AdapterCache(max_bytes=1 << 30)
    served, spans = {}, {}
    for ref in (carry_on, tail):
        adapter = cache.get(ref, base)
        tensors = (
            list(adapter.parameters())
            if hasattr(adapter, "parameters")
            else [t for pair in adapter.weights.values() for t in pair]
        )
        storages = {t.untyped_storage().data_ptr() for t in tensors}
        assert len(storages) == 1  # one block for the whole adapter
        start = storages.pop()
        assert start % 4096 == 0  # a mapping's first page, not a heap chunk
        assert (start, start + 4096 * -(-tensors[0].untyped_storage().nbytes() // 4096)) in (
            _mappings()
        )
        spans[ref.adapter_id] = start
        served[ref.adapter_id] = adapter
    reference = load_carry_on(carry_on.path, base_fingerprints=[base.fingerprint()])
    assert all(
        torch.equal(mine, theirs)
        for mine, theirs in zip(
            served["carry-on"].parameters(), reference.parameters(), strict=True
        )
    )
    prompt = _prompt(base, "served from its own mapping")
    assert (
        generate(base, prompt, GREEDY, served["carry-on"]).token_ids
        == generate(base, prompt, GREEDY, reference).token_ids
    )
    del adapter, tensors, reference
    served.clear()
    cache.evict("carry-on")
    cache.evict("tail")
    gc.collect()
    starts = {start for start, _ in _mappings()}
    assert not set(spans.values()) & starts  # both handed back to the operating system


def test_n_choices_with_seed_are_reproducible(base):
    """n sampled choices with a seed differ from each other and repeat across runs."""
    engine = _engine(base)
    config = GenerationConfig(temperature=1.0, max_new_tokens=16, seed=7)
    prompt = _prompt(base, "tell me")
    first = engine.submit("tiny", prompt, config, n=2).result(timeout=30)
    second = engine.submit("tiny", prompt, config, n=2).result(timeout=30)
    assert first == second
    assert first[0][0] != first[1][0]
    engine.shutdown()


def test_concurrent_gets_of_one_adapter_load_it_once(base, tmp_path):
    """Requests racing for an adapter not yet cached share one load and one object."""
    ref = _saved(base, tmp_path, "a", seed=1)
    cache = AdapterCache(max_bytes=1 << 30)
    barrier = threading.Barrier(4)
    loaded: list[object] = []

    def get() -> None:
        barrier.wait()
        loaded.append(cache.get(ref, base))

    threads = [threading.Thread(target=get) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.loads == 1
    assert cache.hits == 3
    assert all(item is loaded[0] for item in loaded)


def test_a_failed_load_is_raised_to_every_waiter_and_not_cached(base, tmp_path):
    """A load that fails leaves nothing behind: the next get tries again."""
    ref = AdapterRef(adapter_id="gone", path=tmp_path / "missing", sha256="0" * 64)
    cache = AdapterCache(max_bytes=1 << 30)
    for _ in range(2):
        with pytest.raises(ArtifactError):
            cache.get(ref, base)
    assert (len(cache), cache.nbytes, cache.loads) == (0, 0, 0)


def test_a_refused_request_loads_no_adapter(base, tmp_path):
    """Admission is checked before the adapter load: an overloaded engine loads nothing."""
    engine = _engine(base, max_pending=1)
    long = GenerationConfig(temperature=0.0, max_new_tokens=200)
    first = engine.submit("tiny", _prompt(base, "one"), long)
    ref = _saved(base, tmp_path, "a", seed=1)
    with pytest.raises(EngineOverloaded):
        engine.submit("tiny", _prompt(base, "two"), long, adapter=ref)
    assert engine.adapters.loads == 0
    first.cancel()
    engine.shutdown()


def _record_opens(monkeypatch, on_open=None) -> list[str]:
    """Names of the files opened through pathlib from now on (``on_open`` runs after each)."""
    opened: list[str] = []
    real_open = Path.open

    def recording_open(self, *args, **kwargs):
        handle = real_open(self, *args, **kwargs)
        opened.append(self.name)
        if on_open is not None:
            on_open(self)
        return handle

    monkeypatch.setattr(Path, "open", recording_open)
    return opened


def test_a_cold_load_reads_each_file_once_and_loads_the_bytes_it_hashed(
    base, tmp_path, monkeypatch
):
    """A cache miss opens each artifact file once; the weights served are the ones hashed."""
    ref = _saved(base, tmp_path, "a", seed=1)
    other = _saved(base, tmp_path, "b", seed=2)
    reference = load_carry_on(ref.path)

    def swap_weights_once_open(path: Path) -> None:
        # The open handle keeps the old file: a second read by path would get b's weights.
        if path == ref.path / WEIGHTS_FILE:
            shutil.copyfile(other.path / WEIGHTS_FILE, tmp_path / "swap")
            os.replace(tmp_path / "swap", path)

    opened = _record_opens(monkeypatch, swap_weights_once_open)
    loaded = AdapterCache(max_bytes=1 << 30).get(ref, base)
    monkeypatch.undo()
    assert sorted(opened) == sorted([WEIGHTS_FILE, CONFIG_FILE])
    for name, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)


def test_a_mismatched_base_is_refused_before_the_weights_are_read(
    base, other_base, tmp_path, monkeypatch
):
    """The fingerprint in the small config is checked first: the weights stay unread."""
    ref = _saved(base, tmp_path, "a", seed=1)
    opened = _record_opens(monkeypatch)
    with pytest.raises(IncompatibleBaseModelError):
        AdapterCache(max_bytes=1 << 30).get(ref, other_base)
    monkeypatch.undo()
    assert opened == [CONFIG_FILE]


def test_a_cold_tail_load_reads_each_file_once(base, tmp_path, monkeypatch):
    """A tail's three files (PEFT config and weights, our metadata) are each opened once."""
    tail = build_adapter(base, TailConfig(depth=1, rank=4), seed=0)
    info = save_adapter(tail, tmp_path / "tail", base_fingerprints=[base.fingerprint()])
    ref = AdapterRef(adapter_id="tail", path=info.path, sha256=info.sha256)
    opened = _record_opens(monkeypatch)
    AdapterCache(max_bytes=1 << 30).get(ref, base)
    monkeypatch.undo()
    assert sorted(opened) == sorted([PEFT_WEIGHTS_FILE, PEFT_CONFIG_FILE, TAIL_FILE])


def test_the_engines_prefill_chunk_reaches_its_decoder(base):
    """A long prompt through the engine is prefilled one chunk per step, of the configured
    size, and gives what the unchunked decoder gives."""
    prompt = _prompt(base, "a long question " * 6)
    results, prefills = [], []
    for chunk in (4, len(prompt) + 1):
        engine = _engine(base, prefill_chunk=chunk)
        results.append(engine.submit("tiny", prompt, GREEDY).result(timeout=30))
        prefills.append(engine.counters("tiny").prefill_forwards)
        engine.shutdown()
    assert results[0] == results[1]
    assert prefills == [-(-len(prompt) // 4), 1]


def test_unfinished_sequences_include_those_waiting_for_their_prefill(base):
    """What the engine's cancel sweep walks: queued, part-prefilled and running sequences,
    so a request cancelled before its prefill is dropped without running it."""
    from customization.decoder import BatchDecoder

    decoder = BatchDecoder(base, prefill_chunk=4)
    first = decoder.new_sequence(_prompt(base, "a long question " * 6), GREEDY)
    second = decoder.new_sequence(_prompt(base, "hi"), GREEDY)
    decoder.add(first)
    decoder.add(second)
    assert decoder.unfinished == [first, second]  # both waiting
    decoder.step()  # the short prompt is prefilled first; the long one starts its chunks
    assert {id(s) for s in decoder.unfinished} == {id(first), id(second)}
    decoder.cancel(first)
    assert [id(s) for s in decoder.unfinished] == [id(second)]
