"""Serving tails in the shared decode batch, beside base and carry-on rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from customization.base_model import FrozenBase
from customization.checkpoint import load_tail_adapter, save_tail
from customization.config import GenerationConfig, TailConfig
from customization.errors import CustomizationError
from customization.evaluation import heldout_metrics
from customization.features import FeatureData
from customization.generation import BatchDecoder, generate, generate_batch, greedy_reference
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
    """Base, carry-on and two tails of different depths (and ranks) decode together exactly."""
    carry_on = perturb(new_carry_on(serving_base, tiny_config(taps=(1, -1))), seed=5)
    shallow = _served(serving_base, _trained_tail(serving_base, 1, seed=2), tmp_path / "a")
    deep = _served(serving_base, _trained_tail(serving_base, 2, seed=3, rank=2), tmp_path / "b")
    adapters = [None, carry_on, shallow, deep]
    prompts = [_prompt(serving_base, text) for text in ("one", "two two", "three", "four!")]
    requests = [(p, GREEDY, a) for p, a in zip(prompts, adapters, strict=True)]
    alone = [generate(serving_base, p, GREEDY, a).token_ids for p, _, a in requests]
    results, counters = generate_batch(serving_base, requests)
    assert [r.token_ids for r in results] == alone
    assert len(set(map(tuple, alone))) == 4, "the adapters should change the outputs"
    # One base forward per prefill and per decode step, whatever the rows run.
    assert counters.base_forwards == len(requests) + counters.decode_steps


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
    assert not any(s.finished for s in sequences)
    # Prefills run alone: the shallow tail covers 1 layer, the deep one 2.
    assert decoder.counters.tail_delta_products == 3 * MODULES_PER_LAYER
    decoder.step()
    counters = decoder.counters
    assert counters.base_forwards == 4
    assert counters.decode_steps == 1
    # Layer 1 holds both tails' rows in one product; layer 0 only the deep one.
    assert counters.tail_delta_products == 3 * MODULES_PER_LAYER + 2 * MODULES_PER_LAYER
    assert counters.tail_rows == 1 + 1 + 2


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
