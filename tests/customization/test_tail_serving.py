"""Serving tails in the shared decode batch, beside base and carry-on rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from customization.base_model import FrozenBase
from customization.checkpoint import load_tail_adapter, save_tail
from customization.config import GenerationConfig, TailConfig
from customization.decoder import BatchDecoder
from customization.errors import CustomizationError
from customization.evaluation import heldout_metrics
from customization.features import FeatureData
from customization.generation import generate, generate_batch, greedy_reference
from customization.tail import TailAdapter, TailModel
from customization.training import FeatureLayout, build_adapter, evaluate
from tests.helpers.carry_on_kit import (
    lively_base,
    new_carry_on,
    perturb,
    perturb_tail,
    tiny_config,
)

GREEDY = GenerationConfig(temperature=0.0, max_new_tokens=12)
MODULES_PER_LAYER = 7  # q, k, v, o, gate, up, down


@pytest.fixture(scope="module")
def serving_base() -> FrozenBase:
    """Its own copy of the shared tiny base: serving a tail wraps the base's linears."""
    return lively_base(seed=0)


def _trained_tail(base: FrozenBase, depth: int, *, seed: int, rank: int = 4) -> TailModel:
    tail = build_adapter(base, TailConfig(depth=depth, rank=rank), seed=seed)
    assert isinstance(tail, TailModel)
    return perturb_tail(tail, seed=seed)


def _served(base: FrozenBase, tail: TailModel, folder: Path) -> TailAdapter:
    info = save_tail(tail, folder, base_fingerprints=[base.fingerprint()])
    return load_tail_adapter(info.path, base_fingerprints=[base.fingerprint()])


def _prompt(base: FrozenBase, text: str) -> list[int]:
    return base.tokenizer.encode_prompt([{"role": "user", "content": text}])


def test_a_served_tail_decodes_what_training_computes(
    serving_base: FrozenBase, tmp_path: Path
) -> None:
    """Greedy decoding with the engine's per-row LoRA equals recomputing through the tail."""
    tail = _trained_tail(serving_base, 2, seed=1)
    prompt = _prompt(serving_base, "a tail over every layer")
    result = generate(serving_base, prompt, GREEDY, _served(serving_base, tail, tmp_path / "t"))
    assert result.token_ids == greedy_reference(serving_base, prompt, 12, tail)
    assert result.token_ids != generate(serving_base, prompt, GREEDY).token_ids


def test_a_mixed_batch_gives_every_row_what_it_gives_alone(
    serving_base: FrozenBase, tmp_path: Path
) -> None:
    """Base, two same-shape carry-ons and two tails of different depths (and ranks) decode
    together exactly as alone; the carry-ons run as one batched forward per step."""
    carry_on = perturb(new_carry_on(serving_base, tiny_config(taps=(1, -1))), seed=5)
    twin = perturb(new_carry_on(serving_base, tiny_config(taps=(1, -1)), seed=1), seed=6)
    shallow = _served(serving_base, _trained_tail(serving_base, 1, seed=2), tmp_path / "a")
    deep = _served(serving_base, _trained_tail(serving_base, 2, seed=3, rank=2), tmp_path / "b")
    adapters = [None, carry_on, shallow, deep, twin]
    texts = ("one", "two two", "three", "four!", "five five")
    prompts = [_prompt(serving_base, text) for text in texts]
    requests = [(p, GREEDY, a) for p, a in zip(prompts, adapters, strict=True)]
    alone = [generate(serving_base, p, GREEDY, a).token_ids for p, _, a in requests]
    results, counters = generate_batch(serving_base, requests)
    assert [r.token_ids for r in results] == alone
    assert len(set(map(tuple, alone))) == 5, "the adapters should change the outputs"
    # One prefill forward for all five prompts, then one per decode step, whatever the rows run.
    assert counters.prefill_forwards == 1
    assert counters.base_forwards == 1 + counters.decode_steps
    assert all(r.completion_tokens == 12 for r in results)
    assert counters.carry_on_batches == counters.decode_steps == 11


def test_tails_in_one_step_share_one_batched_product_per_layer(
    serving_base: FrozenBase, tmp_path: Path
) -> None:
    """A decode step runs every base layer once for all rows, and per layer and module one
    stacked LoRA product covers every tail row; base rows add none."""
    shallow = _served(serving_base, _trained_tail(serving_base, 1, seed=4), tmp_path / "a")
    deep = _served(serving_base, _trained_tail(serving_base, 2, seed=6), tmp_path / "b")
    decoder = BatchDecoder(serving_base)
    config = GenerationConfig(temperature=0.0, max_new_tokens=8)
    sequences = [
        decoder.new_sequence(_prompt(serving_base, text), config, adapter)
        for text, adapter in (("base row", None), ("shallow", shallow), ("deep", deep))
    ]
    for sequence in sequences:
        decoder.add(sequence)
    decoder.step()  # one prefill forward for the three prompts
    assert not any(s.finished for s in sequences)
    # In the prefill as in a decode step, layer 1 holds both tails' rows in one product and
    # layer 0 only the deep one's.
    assert decoder.counters.tail_delta_products == 2 * MODULES_PER_LAYER
    decoder.step()
    counters = decoder.counters
    assert counters.base_forwards == 2
    assert counters.decode_steps == 1
    assert counters.tail_delta_products == 2 * MODULES_PER_LAYER + 2 * MODULES_PER_LAYER
    assert counters.tail_rows == 1 + 1 + 2


def test_a_decode_step_adds_deltas_to_every_row_with_zeros_for_rows_on_no_tail(
    serving_base: FrozenBase, tmp_path: Path
) -> None:
    """At one token per row the stacks cover every row (zeros for the base row: nothing is
    gathered or scattered) and each row's output is exactly what the gathered path gives
    it: the base row's is the base linear's, bit for bit. A prefill still gathers."""
    import torch

    from customization import batched_lora

    shallow = _served(serving_base, _trained_tail(serving_base, 1, seed=4), tmp_path / "a")
    deep = _served(serving_base, _trained_tail(serving_base, 2, seed=6), tmp_path / "b")
    rows = batched_lora.install(serving_base.model)
    wrapped = [
        m
        for m in serving_base.model.modules()
        if isinstance(m, batched_lora.BatchedLoraLinear) and m.layer == 0
    ]
    assert len(wrapped) == MODULES_PER_LAYER
    layout = [deep, None, shallow, deep]  # layer 0: only the deep tail covers it
    generator = torch.Generator().manual_seed(0)
    try:
        for module in wrapped:
            x = torch.randn(4, 1, module.base.in_features, generator=generator)
            with torch.no_grad():
                rows.use(layout, one_token=True)
                plans = rows.plan(module.layer, module.name, x.device)
                assert plans is not None
                index, a, _ = plans[0]
                assert index is None  # every row: nothing gathered
                assert [bool(a[row].any()) for row in range(4)] == [True, False, False, True]
                dense = module(x)
                rows.use(layout)  # a prefill-like forward: the covered rows gathered
                gathered_plans = rows.plan(module.layer, module.name, x.device)
                assert gathered_plans is not None
                index, _, _ = gathered_plans[0]
                assert index is not None
                assert index.tolist() == [0, 3]
                gathered = module(x)
            rows.clear()
            assert torch.equal(dense[1], module.base(x)[1])  # the base row, bit for bit
            assert torch.equal(dense[2], module.base(x)[2])  # its tail does not cover layer 0
            torch.testing.assert_close(dense, gathered, rtol=1e-6, atol=1e-6)
            assert not torch.equal(dense[0], module.base(x)[0])  # the deep tail's delta
    finally:
        rows.forget()


def test_tails_weights_are_stacked_when_rows_change_not_every_step(
    serving_base: FrozenBase, tmp_path: Path
) -> None:
    """Rows that stay in the batch reuse their stacked LoRA weights step after step; a row
    leaving restacks once; an emptied batch lets go of them."""
    shallow = _served(serving_base, _trained_tail(serving_base, 1, seed=4), tmp_path / "a")
    deep = _served(serving_base, _trained_tail(serving_base, 2, seed=6), tmp_path / "b")
    decoder = BatchDecoder(serving_base)
    short = GenerationConfig(temperature=0.0, max_new_tokens=3)
    long = GenerationConfig(temperature=0.0, max_new_tokens=9)
    prompts = [_prompt(serving_base, t) for t in ("shallow row", "deep row")]
    sequences = [
        decoder.new_sequence(prompts[0], short, shallow),
        decoder.new_sequence(prompts[1], long, deep),
    ]
    for sequence in sequences:
        decoder.add(sequence)
    tails = decoder._tails
    assert tails is not None
    stacked = tails.counters.stacked
    decoder.step()  # the prefill: one layout
    assert tails.counters.stacked - stacked == 2 * MODULES_PER_LAYER  # layers 0 and 1
    decoder.step()  # the first decode step: the running rows' layout, stacked once
    after_first = tails.counters.stacked
    decoder.step()
    assert tails.counters.stacked == after_first  # same rows: nothing stacked again
    while not sequences[0].finished:
        decoder.step()
    decoder.step()  # the deep row alone now: its layout is stacked once
    assert tails.counters.stacked == after_first + 2 * MODULES_PER_LAYER
    while decoder.active:
        decoder.step()
    assert not tails._layouts  # the batch emptied: the stacked weights were let go
    alone = generate(serving_base, prompts[1], long, deep).token_ids
    assert sequences[1].generated == alone


def test_a_tail_for_a_base_of_another_depth_is_not_served(tmp_path: Path) -> None:
    """A tail made for a 2-layer base is refused on a 3-layer one with a clear error."""
    from tests.helpers.tiny_models import tiny_base

    two = lively_base(seed=0)
    served = _served(two, _trained_tail(two, 1, seed=1), tmp_path / "t")
    three = tiny_base(num_layers=3)
    with pytest.raises(CustomizationError, match="made for a 2-layer base"):
        BatchDecoder(three).new_sequence([1, 2, 3], GREEDY, served)


def test_a_tails_held_out_loss_through_serving_equals_training(
    serving_base: FrozenBase, toy_features: tuple[FeatureData, FeatureData], tmp_path: Path
) -> None:
    """Evaluating a served tail from token ids gives the trainer's held-out loss."""
    tail = _trained_tail(serving_base, 2, seed=7)
    served = _served(serving_base, tail, tmp_path / "t")
    _, valid = toy_features
    ours = heldout_metrics(serving_base, served, valid)
    layout = FeatureLayout.for_tail(valid, tail.config)
    reference = evaluate(tail, valid, layout, serving_base.head_weight)
    assert abs(ours["loss"] - reference["loss"]) < 1e-4
    assert ours["token_accuracy"] == pytest.approx(reference["token_accuracy"])


def test_rows_joining_with_batched_and_chunked_prefills_give_what_they_give_alone(
    serving_base: FrozenBase, tmp_path: Path
) -> None:
    """Base, carry-on and tail rows joining a running batch, some prefilled together and a
    long tail prompt in chunks between decode steps, each decode exactly as alone."""
    carry_on = perturb(new_carry_on(serving_base, tiny_config(taps=(1, -1))), seed=8)
    tail = _served(serving_base, _trained_tail(serving_base, 2, seed=9), tmp_path / "t")
    chunk = 64
    decoder = BatchDecoder(serving_base, prefill_chunk=chunk, pace_prefill=False)
    long_text = "a long prompt for the tail row " * 5
    first = [("one", tail), ("two", carry_on)]
    later = [("three", None), ("four", tail), (long_text, tail)]
    sequences = []
    for text, adapter in first:
        sequences.append(decoder.new_sequence(_prompt(serving_base, text), GREEDY, adapter))
        decoder.add(sequences[-1])
    decoder.step()
    decoder.step()
    for text, adapter in later:
        sequences.append(decoder.new_sequence(_prompt(serving_base, text), GREEDY, adapter))
        decoder.add(sequences[-1])
    while decoder.active:
        decoder.step()
    for (text, adapter), sequence in zip(first + later, sequences, strict=True):
        alone = generate(serving_base, _prompt(serving_base, text), GREEDY, adapter)
        assert sequence.generated == alone.token_ids
    assert 2 * max(len(s.prompt_ids) for s in sequences[:4]) <= chunk
    chunks = -(-len(_prompt(serving_base, long_text)) // chunk)
    assert chunks >= 3
    # Two forwards for the short prompts (two rows each), then one per chunk of the long one.
    assert decoder.counters.prefill_forwards == 2 + chunks
    assert decoder.counters.prefill_rows == 4 + chunks
    # All but the first rode in the running rows' decode forwards, tails on both sides.
    assert decoder.counters.packed_forwards == 1 + chunks
