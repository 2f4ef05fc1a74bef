"""Stop strings: bounded in length, and released in time linear in their length."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest

from customization.config import MAX_STOP_CHARS, GenerationConfig
from customization.decoder import BatchDecoder
from customization.sampling import _stop_prefix_at_end
from tests.helpers.tiny_models import tiny_base


def _brute_force(text: str, stop: str) -> int:
    return max((k for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)


def test_a_stop_string_longer_than_the_cap_is_refused() -> None:
    """GenerationConfig names the cap when a stop string is longer than MAX_STOP_CHARS."""
    with pytest.raises(ValueError, match=f"at most {MAX_STOP_CHARS} characters"):
        GenerationConfig(stop=("x" * 100_000,))
    with pytest.raises(ValueError, match="stop"):
        GenerationConfig(stop=("ok", "y" * (MAX_STOP_CHARS + 1)))
    assert GenerationConfig(stop=("z" * MAX_STOP_CHARS,)).stop


def test_the_held_back_suffix_is_the_longest_stop_prefix() -> None:
    """The fast scan agrees with trying every prefix length, on adversarial alphabets."""
    rng = random.Random(7)
    for _ in range(3000):
        alphabet = rng.choice(["ab", "abc", "a", "xyz\n"])
        stop = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        assert _stop_prefix_at_end(text, stop) == _brute_force(text, stop), (text, stop)


def _seconds_per_step(decoder_factory: Callable[[], BatchDecoder], steps: int) -> float:
    """The fastest of three runs (noise on a shared machine only ever adds time)."""
    best = float("inf")
    for _ in range(3):
        decoder = decoder_factory()
        started = time.perf_counter()
        for _ in range(steps):
            decoder.step()
        best = min(best, (time.perf_counter() - started) / steps)
    return best


def test_a_longest_allowed_stop_costs_less_than_a_second_decode_step() -> None:
    """With four adversarial stops of MAX_STOP_CHARS, a decode step stays within 2x a plain one
    (a ratio of two measurements, not a time limit)."""
    base = tiny_base(seed=3)
    prompt = base.tokenizer.encode_prompt([{"role": "user", "content": "hello"}])
    # Trying every prefix length of these took ~MAX_STOP_CHARS**2 character copies per step.
    hostile = tuple(("ab" * MAX_STOP_CHARS)[: MAX_STOP_CHARS - 1 - i] + "\x01" for i in range(4))

    def factory(stop: tuple[str, ...]) -> Callable[[], BatchDecoder]:
        def make() -> BatchDecoder:
            decoder = BatchDecoder(base)
            config = GenerationConfig(temperature=0.0, max_new_tokens=200, stop=stop)
            decoder.add(decoder.new_sequence(prompt, config))
            return decoder

        return make

    plain = _seconds_per_step(factory(()), steps=60)
    stopped = _seconds_per_step(factory(hostile), steps=60)
    assert stopped < 2 * plain, (stopped, plain)


def test_stop_release_matches_the_reference_on_a_real_decode() -> None:
    """Text released with a stop equals the unstopped text cut before the stop's first match."""
    base = tiny_base(seed=5)
    prompt = base.tokenizer.encode_prompt([{"role": "user", "content": "count"}])
    free = BatchDecoder(base)
    sequence = free.new_sequence(prompt, GenerationConfig(temperature=0.0, max_new_tokens=40))
    free.add(sequence)
    while free.active:
        free.step()
    reference = sequence.text
    stop = reference[10:13] if len(reference) >= 13 else reference[-2:]
    stopped = BatchDecoder(base)
    config = GenerationConfig(temperature=0.0, max_new_tokens=40, stop=(stop, "q" * 999))
    cut = stopped.new_sequence(prompt, config)
    stopped.add(cut)
    released = ""
    while stopped.active:
        released += "".join(out.text_delta for out in stopped.step())
    assert released == reference[: reference.find(stop)]
    assert cut.finish_reason == "stop"
