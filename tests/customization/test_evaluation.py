import json

import pytest

from customization.base_model import FrozenBase
from customization.config import GenerationConfig
from customization.datasets import Example, load_dataset
from customization.demo_data import generate_demo_problems
from customization.evaluation import exact_match, features_in_memory, heldout_metrics
from customization.features import FeatureData
from customization.generation import generate
from customization.tokenizer import TokenizedExample
from customization.training import FeatureLayout, evaluate
from tests.helpers.carry_on_kit import new_carry_on, perturb, tiny_config


def _demo_examples(n: int) -> list[Example]:
    rows = generate_demo_problems(n, seed=1)
    return load_dataset("".join(json.dumps(r) + "\n" for r in rows).encode())


def test_exact_match_runs_and_returns_a_fraction(base: FrozenBase) -> None:
    """Exact match decodes each problem and scores the fraction of correct final answers."""
    examples = _demo_examples(3)
    seen: list[tuple[int, int]] = []
    carry_on = perturb(new_carry_on(base, tiny_config()), seed=3)
    result = exact_match(
        base,
        carry_on,
        examples,
        max_new_tokens=4,
        batch_size=2,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert 0.0 <= result.accuracy <= 1.0
    assert len(result.predictions) == len(result.references) == 3
    assert result.references[0] == examples[0].messages[-1]["content"]
    assert seen == [(2, 3), (3, 3)]


def test_exact_match_predictions_are_greedy_replies_to_the_prompt(base: FrozenBase) -> None:
    """Each prediction is the greedy reply to every message before the last assistant turn."""
    examples = _demo_examples(3)
    carry_on = perturb(new_carry_on(base, tiny_config()), seed=4)
    result = exact_match(base, carry_on, examples, max_new_tokens=6, batch_size=3)
    config = GenerationConfig(temperature=0.0, max_new_tokens=6)
    for example, prediction in zip(examples, result.predictions, strict=True):
        prompt = base.tokenizer.encode_prompt(example.messages[:-1])
        assert prediction == generate(base, prompt, config, carry_on).text
    # The random base cannot solve the problems.
    assert result.accuracy == 0.0


def test_heldout_metrics_of_the_base_equal_those_of_a_carry_on_at_init(
    base: FrozenBase, toy_tokenized: list[TokenizedExample]
) -> None:
    """Base-only held-out metrics equal base + a fresh carry-on's (which is the base)."""
    config = tiny_config(taps=(1, -1), tap_mode="ladder")
    data = features_in_memory(base, toy_tokenized, config.taps, batch_size=5)
    base_only = heldout_metrics(base, None, data)
    at_init = heldout_metrics(base, new_carry_on(base, config), data)
    assert base_only == at_init
    assert base_only["loss"] > 0
    assert 0.0 <= base_only["token_accuracy"] <= 1.0
    moved = heldout_metrics(base, perturb(new_carry_on(base, config), seed=1), data)
    assert moved["loss"] != base_only["loss"]


def test_features_in_memory_equal_the_cached_features(
    base: FrozenBase,
    toy_tokenized: list[TokenizedExample],
    toy_features: tuple[FeatureData, FeatureData],
) -> None:
    """In-memory held-out features score exactly like the extracted, cached ones."""
    _, valid = toy_features
    data = features_in_memory(base, toy_tokenized[8:], taps=(0, 1, -1))
    assert data.states == valid.states
    for config in (tiny_config(), tiny_config(taps=(0, 1, -1), tap_mode="ladder")):
        carry_on = perturb(new_carry_on(base, config), seed=2)
        from_cache = evaluate(
            carry_on,
            valid,
            FeatureLayout.for_config(valid, config, base.num_layers),
            base.head_weight,
        )
        assert heldout_metrics(base, carry_on, data) == pytest.approx(from_cache, rel=1e-5)
