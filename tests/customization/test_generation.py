import pytest
import torch

from customization.base_model import FrozenBase
from customization.carry_on import CarryOn
from customization.config import CarryOnConfig, GenerationConfig
from customization.decoder import (
    MIN_PREFILL_CHUNK,
    PREFILL_CHUNK_GROWTH,
    PREFILL_SHARE_OF_STEP,
)
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
    # One prefill forward for the three prompts, then one shared base forward per decode step.
    assert counters.prefill_forwards == 1
    assert counters.prefill_rows == len(requests)
    assert counters.base_forwards == 1 + counters.decode_steps
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
    carry_on = build_carry_on(config, width=32, seed=0)
    with pytest.raises(CustomizationError) as caught:
        generate(base, _prompt(base, "hi"), GREEDY, carry_on)
    assert caught.value.code == "model_not_servable"


def test_greedy_decoding_is_deterministic(base: FrozenBase, ladder: CarryOn) -> None:
    """Two greedy runs give identical tokens and text."""
    prompt = _prompt(base, "hi")
    first = generate(base, prompt, GREEDY, ladder)
    torch.manual_seed(123)  # the global RNG plays no part in greedy decoding
    assert generate(base, prompt, GREEDY, ladder) == first


def _same_shape(base: FrozenBase, taps: tuple[int, ...], seed: int) -> CarryOn:
    """A ladder carry-on of the ``ladder`` fixture's shape with its own weights."""
    config = tiny_config(taps=taps, tap_mode="ladder")
    return perturb(new_carry_on(base, config, seed=seed), seed=30 + seed)


def test_same_shape_carry_ons_run_as_one_batched_forward_per_step(
    base: FrozenBase, ladder: CarryOn, mixer: CarryOn
) -> None:
    """Same-shape carry-ons (even on other taps) decode as alone, one batched forward a step."""
    same = [ladder, _same_shape(base, (1, -1), 1), _same_shape(base, (0, -1), 2)]
    texts = ["one", "two two", "three three three", "four", "five"]
    adapters: list[CarryOn | None] = [*same, mixer, None]
    requests = [(_prompt(base, t), GREEDY, a) for t, a in zip(texts, adapters, strict=True)]
    results, counters = generate_batch(base, requests)
    alone = [generate(base, p, c, a).token_ids for p, c, a in requests]
    assert [r.token_ids for r in results] == alone
    assert len(set(map(tuple, alone))) == len(alone), "the carry-ons should change outputs"
    assert all(r.completion_tokens == 16 for r in results)
    # Two shape groups (the three ladders, the mixer): two batched forwards per step.
    assert counters.decode_steps == 15
    assert counters.carry_on_batches == 2 * counters.decode_steps
    assert counters.carry_on_forwards == 4 * 16


def test_carry_on_rows_joining_and_leaving_a_group_decode_as_alone(
    base: FrozenBase, ladder: CarryOn
) -> None:
    """A group keeps each row exact as a longer prompt joins and a shorter reply leaves."""
    other = _same_shape(base, (1, -1), 3)
    early, late = _prompt(base, "first"), _prompt(base, "a much longer prompt " * 4)
    short = GenerationConfig(temperature=0.0, max_new_tokens=6)
    decoder = BatchDecoder(base)
    first = decoder.new_sequence(early, GREEDY, ladder)
    brief = decoder.new_sequence(early, short, other)
    decoder.add(first)
    decoder.add(brief)
    for _ in range(3):
        decoder.step()
    second = decoder.new_sequence(late, GREEDY, other)
    decoder.add(second)
    while decoder.active:
        decoder.step()
    assert first.generated == generate(base, early, GREEDY, ladder).token_ids
    assert brief.generated == generate(base, early, short, other).token_ids
    assert second.generated == generate(base, late, GREEDY, other).token_ids
    assert decoder.counters.carry_on_batches == decoder.counters.decode_steps


def test_a_base_only_batch_never_asks_for_intermediate_states(base: FrozenBase) -> None:
    """Rows without a carry-on take only the base's final state from each forward."""
    asked: list[bool] = []

    def record(module: object, args: object, kwargs: dict[str, object]) -> None:
        asked.append(bool(kwargs.get("output_hidden_states")))

    handle = base.backbone.register_forward_pre_hook(record, with_kwargs=True)
    try:
        generate_batch(base, [(_prompt(base, "hi"), GREEDY, None)] * 2)
    finally:
        handle.remove()
    assert asked
    assert not any(asked)


def _decode_until_done(decoder: BatchDecoder) -> None:
    while decoder.active:
        decoder.step()


def test_requests_joining_in_one_step_are_prefilled_in_one_forward(
    base: FrozenBase, ladder: CarryOn, mixer: CarryOn
) -> None:
    """Three requests added together (two carry-ons, one base) share one prefill forward
    while a running row keeps decoding, and every row decodes as alone."""
    decoder = BatchDecoder(base)
    running = decoder.new_sequence(_prompt(base, "first"), GREEDY, ladder)
    decoder.add(running)
    for _ in range(3):
        decoder.step()
    before = decoder.counters.prefill_forwards
    texts = ("joins", "joins too, longer", "and a base row")
    adapters: list[CarryOn | None] = [mixer, _same_shape(base, (0, -1), 4), None]
    joining = [
        decoder.new_sequence(_prompt(base, t), GREEDY, a)
        for t, a in zip(texts, adapters, strict=True)
    ]
    for sequence in joining:
        decoder.add(sequence)
    outputs = decoder.step()
    assert decoder.counters.prefill_forwards == before + 1 < before + len(joining)
    assert [o.sequence for o in outputs] == [running, *joining]  # a token each, in one step
    _decode_until_done(decoder)
    assert running.generated == generate(base, _prompt(base, "first"), GREEDY, ladder).token_ids
    for text, adapter, sequence in zip(texts, adapters, joining, strict=True):
        assert sequence.generated == generate(base, _prompt(base, text), GREEDY, adapter).token_ids


@pytest.mark.parametrize("name", ["ladder", "mixer", "none"])
def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(
    base: FrozenBase, request: pytest.FixtureRequest, ladder: CarryOn, name: str
) -> None:
    """A prompt over the chunk size prefills one chunk per step while the running rows get a
    token every step; it, its carry-on (and cache) included, decodes as if prefilled whole."""
    adapter: CarryOn | None = None if name == "none" else request.getfixturevalue(name)
    chunk = 16
    decoder = BatchDecoder(base, prefill_chunk=chunk)
    early = [
        decoder.new_sequence(_prompt(base, "one"), GREEDY, ladder),
        decoder.new_sequence(_prompt(base, "two"), GREEDY, None),
    ]
    for sequence in early:
        decoder.add(sequence)
    while len(decoder.sequences) < len(early):  # two short prompts overflow one 16-token chunk
        decoder.step()
    late = _prompt(base, "a much longer prompt that arrives while the others decode " * 2)
    chunks = -(-len(late) // chunk)
    assert chunks >= 4
    joining = decoder.new_sequence(late, GREEDY, adapter)
    decoder.add(joining)
    for _ in range(chunks):
        counted = decoder.counters.as_dict()
        outputs = decoder.step()
        after = decoder.counters
        assert after.decode_steps == counted["decode_steps"] + 1  # nobody waits a whole prompt
        assert after.prefill_forwards == counted["prefill_forwards"] + 1  # one chunk a step
        # ... riding in the running rows' decode forward: one base forward a step.
        assert after.base_forwards == counted["base_forwards"] + 1
        assert after.packed_forwards == counted["packed_forwards"] + 1
        assert {id(o.sequence) for o in outputs} >= {id(s) for s in early}
    assert len(joining.generated) == 1  # its first token came with the last chunk
    _decode_until_done(decoder)
    assert joining.generated == generate(base, late, GREEDY, adapter).token_ids
    assert joining.generated == greedy_reference(base, late, 16, adapter)
    assert early[0].generated == generate(base, _prompt(base, "one"), GREEDY, ladder).token_ids
    assert early[1].generated == generate(base, _prompt(base, "two"), GREEDY).token_ids


def test_prefill_forwards_are_paced_to_the_running_rows_step(base: FrozenBase) -> None:
    """With nobody running a long prompt's chunk is the whole prefill chunk; with rows
    running it is what adds PREFILL_SHARE_OF_STEP of their decode step (learned from the
    chunks it times), between MIN_PREFILL_CHUNK and the prefill chunk, growing at most
    PREFILL_CHUNK_GROWTH-fold at once."""
    assert (PREFILL_SHARE_OF_STEP, PREFILL_CHUNK_GROWTH) == (0.3, 1.25)  # the figures below
    decoder = BatchDecoder(base, prefill_chunk=256)
    assert decoder._chunk_budget() == 256  # nobody waits for a token
    running = decoder.new_sequence(_prompt(base, "running"), GREEDY)
    decoder.add(running)
    decoder.step()
    decoder.step()  # a decode step: its time is measured
    assert decoder.sequences
    assert decoder._step_seconds is not None
    assert decoder._chunk_budget() == MIN_PREFILL_CHUNK  # nothing learned yet: the floor
    decoder._step_seconds = 0.1
    decoder._pace(64, 0.4)  # far over a step: back to the floor
    assert decoder._chunk_budget() == MIN_PREFILL_CHUNK
    decoder._pace(MIN_PREFILL_CHUNK, 0.001)  # far under: it grows by a quarter, no more
    assert decoder._chunk_budget() == 10
    decoder._paced_chunk = 32
    decoder._pace(32, 0.064)  # 32 tokens added 0.64 of a step: 0.3 of a step fits 15
    assert decoder._chunk_budget() == 15
    decoder._pace(15, 0.0)  # lost in the step's noise: it grows by a quarter
    assert decoder._chunk_budget() == 18
    for _ in range(16):
        decoder._pace(decoder._chunk_budget(), 0.001)
    assert decoder._chunk_budget() == 256  # never above the chunk
    unpaced = BatchDecoder(base, prefill_chunk=256, pace_prefill=False)
    unpaced.add(unpaced.new_sequence(_prompt(base, "running"), GREEDY))
    unpaced.step()
    unpaced.step()
    assert unpaced._chunk_budget() == 256


def test_a_paced_long_prompt_joins_without_stalling_the_running_rows(
    base: FrozenBase, ladder: CarryOn
) -> None:
    """Paced, a prompt over the chunk joining a running batch costs the running rows no
    step: every step still gives each of them a token, and every row decodes as alone."""
    decoder = BatchDecoder(base, prefill_chunk=32)
    early = decoder.new_sequence(_prompt(base, "one"), GREEDY, ladder)
    decoder.add(early)
    decoder.step()
    late_prompt = _prompt(base, "a much longer prompt that arrives while the others decode " * 3)
    assert len(late_prompt) > 32 > MIN_PREFILL_CHUNK
    late = decoder.new_sequence(late_prompt, GREEDY, ladder)
    decoder.add(late)
    while not late.generated and not late.finished:
        before = len(early.generated)
        decoder.step()
        assert len(early.generated) == before + 1 or early.finished
    _decode_until_done(decoder)
    assert late.generated == generate(base, late_prompt, GREEDY, ladder).token_ids
    assert early.generated == generate(base, _prompt(base, "one"), GREEDY, ladder).token_ids


def test_packed_and_separate_prefill_forwards_give_the_same_tokens(
    base: FrozenBase, ladder: CarryOn
) -> None:
    """A long prompt and two short ones joining running rows decode the same whether their
    chunks ride in the decode forwards (packed) or run as forwards of their own, and only
    the packed decoder runs one base forward a step."""
    texts = ("one", "two two")
    late = _prompt(base, "a long prompt that joins the running rows, chunk by chunk " * 3)
    results = {}
    for pack in (True, False):
        decoder = BatchDecoder(base, prefill_chunk=24, pace_prefill=False, pack_prefill=pack)
        running = [decoder.new_sequence(_prompt(base, t), GREEDY, ladder) for t in texts]
        for sequence in running:
            decoder.add(sequence)
        decoder.step()
        decoder.step()
        joining = [
            decoder.new_sequence(late, GREEDY, ladder),
            decoder.new_sequence(_prompt(base, "three"), GREEDY, None),
        ]
        for sequence in joining:
            decoder.add(sequence)
        _decode_until_done(decoder)
        results[pack] = ([s.generated for s in running + joining], decoder.counters)
    assert results[True][0] == results[False][0]
    assert results[True][0][2] == generate(base, late, GREEDY, ladder).token_ids
    packed, separate = results[True][1], results[False][1]
    assert packed.packed_forwards >= 3
    assert separate.packed_forwards == 0
    assert (
        packed.base_forwards
        == packed.decode_steps + packed.prefill_forwards - packed.packed_forwards
    )
    assert separate.base_forwards == separate.decode_steps + separate.prefill_forwards


def test_short_prompts_are_prefilled_while_a_long_one_is_part_way(
    base: FrozenBase, ladder: CarryOn
) -> None:
    """A short request arriving during a long prompt's chunks is prefilled in the next step
    (ahead of the remaining chunks), and both decode as alone."""
    decoder = BatchDecoder(base, prefill_chunk=32)
    long_prompt = _prompt(base, "a long prompt, long enough for several chunks " * 3)
    long = decoder.new_sequence(long_prompt, GREEDY, ladder)
    decoder.add(long)
    decoder.step()
    short = decoder.new_sequence(_prompt(base, "hi"), GREEDY, ladder)
    decoder.add(short)
    outputs = decoder.step()
    assert [o.sequence for o in outputs] == [short]
    assert not long.generated
    _decode_until_done(decoder)
    assert long.generated == generate(base, long_prompt, GREEDY, ladder).token_ids
    assert short.generated == generate(base, _prompt(base, "hi"), GREEDY, ladder).token_ids


def test_a_request_cancelled_before_its_prefill_never_runs(base: FrozenBase) -> None:
    """Cancelling a queued or part-prefilled sequence leaves the decoder with nothing to do."""
    decoder = BatchDecoder(base, prefill_chunk=8)
    queued = decoder.new_sequence(_prompt(base, "queued"), GREEDY)
    decoder.add(queued)
    decoder.cancel(queued)
    assert decoder.active == 0
    chunked = decoder.new_sequence(_prompt(base, "a prompt of several chunks"), GREEDY)
    decoder.add(chunked)
    decoder.step()
    assert decoder.active == 1
    decoder.cancel(chunked)
    assert decoder.active == 0
    assert decoder.step() == []
    assert chunked.finish_reason == "stop"


def test_a_prefill_chunk_below_one_token_is_refused(base: FrozenBase) -> None:
    """The chunk size must be a positive number of tokens."""
    with pytest.raises(ValueError, match="at least 1"):
        BatchDecoder(base, prefill_chunk=0)


def test_the_decoder_reports_the_bytes_its_kv_caches_hold(
    base: FrozenBase, ladder: CarryOn
) -> None:
    """What the KV caches hold (the base's for every row, the carry-on's for its row) is
    reported while decoding, at least the slots filled and at most their doubled room, and
    nothing once the batch has emptied."""
    decoder = BatchDecoder(base)
    assert decoder.kv_cache_bytes() == 0
    rows = [
        decoder.new_sequence(_prompt(base, "a base row"), GREEDY),
        decoder.new_sequence(_prompt(base, "a carry-on row"), GREEDY, ladder),
    ]
    for row in rows:
        decoder.add(row)
    for _ in range(4):
        decoder.step()
    config, carry_on = base.model.config, ladder.config
    slot = (
        4
        * config.num_hidden_layers
        * config.num_key_value_heads
        * (config.hidden_size // config.num_attention_heads)
    )  # keys and values of one token, float32, in the base's cache
    carry_on_slot = 4 * 2 * carry_on.n_blocks * carry_on.d_model
    filled = len(rows) * (len(rows[0].prompt_ids) + 4) * slot
    held = decoder.kv_cache_bytes()
    assert filled <= held <= 2 * filled + 2 * 64 * (2 * slot + carry_on_slot)
    while decoder.active:
        decoder.step()
    assert decoder.kv_cache_bytes() == 0
