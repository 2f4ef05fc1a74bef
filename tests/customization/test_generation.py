import pytest
import torch

from customization.base_model import FrozenBase
from customization.carry_on import CarryOn
from customization.config import CarryOnConfig, GenerationConfig
from customization.errors import ContextLengthError, CustomizationError
from customization.generation import (
    BatchDecoder,
    generate,
    generate_batch,
    greedy_reference,
    stream,
)
from customization.training import build_carry_on
from tests.helpers.carry_on_kit import new_carry_on, perturb, tiny_config

GREEDY = GenerationConfig(temperature=0.0, max_new_tokens=16)


def _prompt(base: FrozenBase, text: str) -> list[int]:
    return base.tokenizer.encode_prompt([{"role": "user", "content": text}])


@pytest.fixture(scope="module")
def ladder(base: FrozenBase) -> CarryOn:
    """A ladder carry-on with an intermediate tap, moved far enough to change outputs."""
    return perturb(new_carry_on(base, tiny_config(taps=(1, -1), tap_mode="ladder")), seed=11)


@pytest.fixture(scope="module")
def mixer(base: FrozenBase) -> CarryOn:
    """A second, differently shaped carry-on (mix over three taps)."""
    return perturb(new_carry_on(base, tiny_config(taps=(0, 1, -1)), seed=1), seed=12)


@pytest.mark.parametrize("text", ["hi", "Tell me a story about a carry-on."])
def test_greedy_with_kv_cache_equals_recomputation_from_scratch(
    base: FrozenBase, text: str
) -> None:
    """Base-only greedy decoding with the KV cache matches recomputing every step."""
    prompt = _prompt(base, text)
    result = generate(base, prompt, GREEDY)
    assert result.token_ids == greedy_reference(base, prompt, 16, None)
    assert result.prompt_tokens == len(prompt)
    assert len(set(result.token_ids)) > 3  # the tiny base does not just repeat one token


@pytest.mark.parametrize("name", ["ladder", "mixer"])
def test_greedy_with_both_kv_caches_equals_recomputation_with_a_carry_on(
    base: FrozenBase, request: pytest.FixtureRequest, name: str
) -> None:
    """Base + carry-on decoding with both caches matches recomputing every step."""
    carry_on: CarryOn = request.getfixturevalue(name)
    prompt = _prompt(base, "Tell me a story about a carry-on.")
    result = generate(base, prompt, GREEDY, carry_on)
    assert result.token_ids == greedy_reference(base, prompt, 16, carry_on)
    assert result.token_ids != generate(base, prompt, GREEDY).token_ids  # it does change outputs


def test_mixed_batch_equals_each_request_alone_and_shares_the_base_forward(
    base: FrozenBase, ladder: CarryOn, mixer: CarryOn
) -> None:
    """Two carry-ons and a base-only row decode together exactly as alone, one base pass/step."""
    requests = [
        (_prompt(base, "A longer prompt about many things at once."), GREEDY, ladder),
        (_prompt(base, "hi"), GenerationConfig(temperature=0.0, max_new_tokens=7), mixer),
        (_prompt(base, "base only"), GenerationConfig(temperature=0.0, max_new_tokens=11), None),
    ]
    results, counters = generate_batch(base, requests)
    for (prompt, config, carry_on), result in zip(requests, results, strict=True):
        alone = generate(base, prompt, config, carry_on)
        assert result.token_ids == alone.token_ids
        assert result.text == alone.text
        assert result.finish_reason == alone.finish_reason
    assert [r.completion_tokens for r in results] == [16, 7, 11]
    # One prefill per request, then one shared base forward per decode step.
    assert counters.base_forwards == len(requests) + counters.decode_steps
    assert counters.decode_steps == 15
    assert counters.decode_rows == 15 + 6 + 10 > counters.decode_steps
    assert counters.carry_on_forwards == 16 + 7


def test_a_sequence_joining_a_running_batch_decodes_as_alone(
    base: FrozenBase, ladder: CarryOn
) -> None:
    """A request added mid-decode (longer prompt than the batch) gets the same tokens."""
    early = _prompt(base, "first")
    late = _prompt(base, "a much longer prompt that arrives while the first one decodes")
    decoder = BatchDecoder(base)
    first = decoder.new_sequence(early, GREEDY, ladder)
    decoder.add(first)
    for _ in range(4):
        decoder.step()
    second = decoder.new_sequence(late, GREEDY, None)
    decoder.add(second)
    while decoder.active:
        decoder.step()
    assert first.generated == generate(base, early, GREEDY, ladder).token_ids
    assert second.generated == generate(base, late, GREEDY).token_ids


def test_stop_strings_are_never_emitted_and_end_with_stop(base: FrozenBase) -> None:
    """Text ends right before the first stop string, which no streamed delta contains."""
    prompt = _prompt(base, "Tell me a story about a carry-on.")
    free = generate(base, prompt, GREEDY)
    stop = free.text[5:7]
    assert len(stop) == 2
    assert stop in free.text
    config = GenerationConfig(temperature=0.0, max_new_tokens=16, stop=(stop, "never-seen"))
    outputs = list(stream(base, prompt, config))
    result = generate(base, prompt, config)
    assert result.finish_reason == "stop"
    assert result.text == free.text[: free.text.index(stop)]
    assert "".join(o.text_delta for o in outputs) == result.text
    assert outputs[-1].sequence.finish_reason == "stop"


def test_a_stop_token_ends_with_stop_and_is_not_emitted(base: FrozenBase) -> None:
    """Sampling an end-of-turn token finishes the sequence without adding it."""
    prompt = _prompt(base, "hi")
    free = generate(base, prompt, GREEDY).token_ids
    cut = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    decoder = BatchDecoder(base)
    sequence = decoder.new_sequence(prompt, GREEDY)
    sequence.stop_token_ids = (free[cut],)  # pretend that token ends the turn
    decoder.add(sequence)
    while decoder.active:
        decoder.step()
    assert sequence.finish_reason == "stop"
    assert sequence.generated == free[:cut]
    assert decoder.counters.decode_steps == cut


def test_max_new_tokens_ends_with_length(base: FrozenBase) -> None:
    """A reply cut by max_new_tokens has exactly that many tokens and finish_reason length."""
    result = generate(base, _prompt(base, "hi"), GenerationConfig(temperature=0, max_new_tokens=5))
    assert result.finish_reason == "length"
    assert result.completion_tokens == 5


def test_sampling_with_a_seed_is_reproducible(base: FrozenBase, ladder: CarryOn) -> None:
    """The same seed gives the same tokens; other seeds give other tokens."""
    prompt = _prompt(base, "hi")

    def sample(seed: int) -> list[int]:
        config = GenerationConfig(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=seed)
        return generate(base, prompt, config, ladder).token_ids

    first = sample(1)
    assert sample(1) == first
    assert sample(2) != first or sample(3) != first


def test_top_k_one_equals_greedy(base: FrozenBase, ladder: CarryOn) -> None:
    """Sampling restricted to the single most likely token is greedy decoding."""
    prompt = _prompt(base, "Tell me a story about a carry-on.")
    sampled = generate(
        base, prompt, GenerationConfig(temperature=1.5, top_k=1, max_new_tokens=16, seed=3), ladder
    )
    assert sampled.token_ids == generate(base, prompt, GREEDY, ladder).token_ids


def test_a_tiny_top_p_equals_greedy(base: FrozenBase) -> None:
    """Nucleus sampling keeps at least the most likely token, so a tiny top_p is greedy."""
    prompt = _prompt(base, "hi")
    config = GenerationConfig(temperature=1.0, top_p=1e-6, max_new_tokens=16, seed=0)
    assert generate(base, prompt, config).token_ids == generate(base, prompt, GREEDY).token_ids


def test_prompt_longer_than_the_context_window_raises(base: FrozenBase) -> None:
    """A prompt that fills the context window is a ContextLengthError naming the limit."""
    prompt = [5] * base.max_position_embeddings
    with pytest.raises(ContextLengthError, match="256 tokens") as caught:
        generate(base, prompt, GREEDY)
    assert caught.value.param == "messages"
    with pytest.raises(ContextLengthError, match="empty"):
        generate(base, [], GREEDY)


def test_generation_stops_at_the_context_window(base: FrozenBase) -> None:
    """max_new_tokens is capped by the room left in the context window."""
    prompt = [5] * (base.max_position_embeddings - 3)
    result = generate(base, prompt, GenerationConfig(temperature=0.0, max_new_tokens=50))
    assert result.finish_reason == "length"
    assert result.completion_tokens == 3


def test_streamed_text_deltas_concatenate_to_the_final_text(
    base: FrozenBase, ladder: CarryOn
) -> None:
    """Joining every streamed delta gives exactly the final text, one output per token."""
    prompt = _prompt(base, "Tell me a story about a carry-on.")
    config = GenerationConfig(temperature=1.0, max_new_tokens=24, seed=5)
    outputs = list(stream(base, prompt, config, ladder))
    result = generate(base, prompt, config, ladder)
    assert "".join(o.text_delta for o in outputs) == result.text
    assert [o.token_id for o in outputs] == result.token_ids
    assert len(outputs) == result.completion_tokens == 24


def test_repetition_penalty_changes_greedy_output(base: FrozenBase) -> None:
    """A strong repetition penalty steers greedy decoding away from tokens already seen."""
    prompt = _prompt(base, "hi")
    plain = generate(base, prompt, GenerationConfig(temperature=0, max_new_tokens=16))
    penalised = generate(
        base, prompt, GenerationConfig(temperature=0, max_new_tokens=16, repetition_penalty=5.0)
    )
    assert penalised.token_ids != plain.token_ids


def test_multi_base_carry_on_is_not_served(base: FrozenBase) -> None:
    """Generation refuses a carry-on that reads several bases, with a clear code."""
    config = CarryOnConfig(d_model=16, n_heads=2, taps=(-1, -1), tap_bases=(0, 1))
    carry_on = build_carry_on(config, tap_sizes=[32, 32], hidden_size=32, seed=0)
    with pytest.raises(CustomizationError) as caught:
        generate(base, _prompt(base, "hi"), GREEDY, carry_on)
    assert caught.value.code == "model_not_servable"


def test_greedy_decoding_is_deterministic(base: FrozenBase, ladder: CarryOn) -> None:
    """Two greedy runs give identical tokens and text."""
    prompt = _prompt(base, "hi")
    first = generate(base, prompt, GREEDY, ladder)
    torch.manual_seed(123)  # the global RNG plays no part in greedy decoding
    assert generate(base, prompt, GREEDY, ladder) == first
