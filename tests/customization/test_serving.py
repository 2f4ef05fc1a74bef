"""The serving engine: shared base forwards, adapter cache, admission control."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from customization.checkpoint import save_carry_on
from customization.config import CarryOnConfig, GenerationConfig
from customization.errors import ArtifactError, EngineOverloaded
from customization.generation import generate
from customization.serving import AdapterCache, AdapterRef, ServingEngine
from customization.training import build_carry_on
from tests.helpers.tiny_models import tiny_base

GREEDY = GenerationConfig(temperature=0.0, max_new_tokens=12)


@pytest.fixture(scope="module")
def base():
    return tiny_base(seed=3)


def _trained_like(base, seed: int):
    """A carry-on with non-zero weights, so it changes the base's output."""
    carry_on = build_carry_on(
        CarryOnConfig(d_model=16, n_heads=2, taps=(-1, 1), tap_mode="ladder"),
        tap_sizes=[base.hidden_size, base.hidden_size],
        hidden_size=base.hidden_size,
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
