import json
from typing import Any

import pytest

from customization.answers import checkable_examples
from customization.base_model import FrozenBase
from customization.config import GenerationConfig
from customization.datasets import Example, load_dataset
from customization.demo_data import generate_demo_problems
from customization.errors import TrainingCancelled
from customization.evaluation import (
    evaluate_models,
    exact_match,
    features_in_memory,
    heldout_metrics,
)
from customization.features import FeatureData
from customization.generation import generate
from customization.tokenizer import TokenizedExample, tokenize_examples
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


# -- several models on one held-out set ---------------------------------------------------------


def _mixed_examples() -> list[Example]:
    """Demo problems ("#### N" answers) interleaved with toy chats that have none."""
    from tests.helpers.carry_on_kit import toy_examples

    mixed: list[Example] = []
    for problem, chat in zip(_demo_examples(5), toy_examples(5), strict=True):
        mixed += [problem, chat]
    return mixed


def test_evaluate_models_scores_each_model_as_if_scored_alone(base: FrozenBase) -> None:
    """Each model's loss and accuracy equal heldout_metrics on features made for it alone,
    whatever the chunk size."""
    examples = _mixed_examples()
    carry_ons = [
        perturb(new_carry_on(base, tiny_config()), seed=5),
        perturb(new_carry_on(base, tiny_config(taps=(0, 1, -1), tap_mode="ladder")), seed=6),
    ]
    models = [None, *carry_ons]
    tokenized = tokenize_examples(examples, base.tokenizer, max_length=512)
    for chunk in (8, 64):
        report = evaluate_models(base, models, examples, max_length=512, chunk_examples=chunk)
        assert report.n_examples == len(examples)
        for model, scores in zip(models, report.scores, strict=True):
            taps = model.config.taps if model is not None else (-1,)
            alone = heldout_metrics(base, model, features_in_memory(base, tokenized, taps))
            assert scores.loss == pytest.approx(alone["loss"], rel=1e-6)
            assert scores.token_accuracy == pytest.approx(alone["token_accuracy"], rel=1e-6)
            assert scores.exact_match is None
    assert len({s.loss for s in report.scores}) == 3


def test_evaluate_models_runs_the_base_once_per_batch_for_all_models(
    base: FrozenBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The base forward is shared: its calls depend on the examples, not on the models."""
    from customization import evaluation

    calls: list[int] = []
    real = evaluation.batch_hidden_states

    def counting(bases: Any, batch: Any, states: Any) -> Any:
        calls.append(len(batch))
        return real(bases, batch, states)

    monkeypatch.setattr(evaluation, "batch_hidden_states", counting)
    models = [None, *(perturb(new_carry_on(base, tiny_config()), seed=s) for s in (1, 2, 3))]
    evaluate_models(base, models, _mixed_examples(), max_length=512, chunk_examples=8)
    assert calls == [8, 2]


def test_exact_match_decodes_only_the_checkable_problems(base: FrozenBase) -> None:
    """The sample is the first problems whose answer ends in "#### N"; each model's
    predictions are exact_match's on exactly those, reported as they are known."""
    examples = _mixed_examples()
    carry_on = perturb(new_carry_on(base, tiny_config()), seed=7)
    seen: list[tuple[int, float | None]] = []
    report = evaluate_models(
        base,
        [None, carry_on],
        examples,
        max_length=512,
        exact_match_problems=3,
        max_new_tokens=5,
        batch_size=2,
        chunk_examples=4,
        on_scores=lambda i, s: seen.append((i, s.exact_match)),
    )
    assert report.problems == checkable_examples(examples)[:3] == examples[0:6:2]
    for model, scores in zip([None, carry_on], report.scores, strict=True):
        alone = exact_match(base, model, report.problems, max_new_tokens=5, batch_size=2)
        assert scores.predictions == alone.predictions
        assert scores.exact_match == alone.accuracy == scores.n_correct / 3
    assert seen == [(0, None), (1, None), (0, 0.0), (1, 0.0)]


def test_evaluate_models_stops_when_asked(base: FrozenBase) -> None:
    """should_stop sees the fraction done grow; True stops the run with TrainingCancelled."""
    fractions: list[float] = []

    def stop_halfway(fraction: float) -> bool:
        fractions.append(fraction)
        return fraction >= 0.5

    with pytest.raises(TrainingCancelled):
        evaluate_models(
            base,
            [None, None],
            _mixed_examples(),
            max_length=512,
            exact_match_problems=2,
            max_new_tokens=2,
            chunk_examples=8,
            should_stop=stop_halfway,
        )
    assert fractions == sorted(fractions)
    assert fractions[0] == 0.0
    assert 0.5 <= fractions[-1] < 1.0


def test_evaluate_models_scores_a_tail_beside_carry_ons(tmp_path: Any) -> None:
    """A tail (scored through the serving path) gets the figures heldout_metrics gives it
    alone, in one run with the base and a carry-on."""
    from customization.checkpoint import load_tail_adapter, save_tail
    from customization.config import TailConfig
    from customization.tail import TailModel
    from customization.training import build_adapter
    from tests.helpers.carry_on_kit import lively_base, perturb_tail

    own = lively_base(seed=0)  # serving a tail wraps the base's linears: not the shared one
    tail = build_adapter(own, TailConfig(depth=1, rank=4), seed=1)
    assert isinstance(tail, TailModel)
    perturb_tail(tail, seed=1)
    info = save_tail(tail, tmp_path / "tail", base_fingerprints=[own.fingerprint()])
    served = load_tail_adapter(info.path, base_fingerprints=[own.fingerprint()])
    carry_on = perturb(new_carry_on(own, tiny_config()), seed=8)
    examples = _mixed_examples()
    report = evaluate_models(own, [None, served, carry_on], examples, max_length=512)
    tokenized = tokenize_examples(examples, own.tokenizer, max_length=512)
    alone = heldout_metrics(own, served, features_in_memory(own, tokenized, (-1,)))
    assert report.scores[1].loss == pytest.approx(alone["loss"], rel=1e-6)
    assert report.scores[1].loss != report.scores[0].loss
