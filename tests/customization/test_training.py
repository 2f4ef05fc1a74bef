import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from customization.base_model import FrozenBase
from customization.carry_on import CarryOn
from customization.checkpoint import (
    ArtifactInfo,
    checkpoint_path,
    load_initial_weights,
    save_adapter,
)
from customization.config import CarryOnConfig, TailConfig, TrainingConfig
from customization.errors import ArtifactError, IncompatibleBaseModelError, TrainingCancelled
from customization.evaluation import features_in_memory
from customization.features import FeatureData
from customization.tail import TailModel
from customization.training import (
    FeatureLayout,
    LogitsBuffer,
    Trainable,
    TrainingCallbacks,
    TrainingResult,
    build_adapter,
    evaluate,
    head_loss,
    lr_at,
    make_batch,
)
from tests.helpers.carry_on_kit import (
    RESUMABLE,
    new_carry_on,
    perturb,
    perturb_tail,
    tiny_config,
    toy_examples,
    train_on_base,
)
from tests.helpers.tiny_models import tiny_base


def _cancel_after(steps: int) -> TrainingCallbacks:
    """Callbacks whose cancel check says stop once ``steps`` steps have run."""
    polls: list[int] = []

    def should_cancel() -> bool:
        polls.append(1)
        return len(polls) > steps

    return TrainingCallbacks(should_cancel=should_cancel)


def _assert_same_weights(a: CarryOn, b: CarryOn) -> None:
    left, right = a.state_dict(), b.state_dict()
    assert left.keys() == right.keys()
    for name, value in left.items():
        assert torch.equal(value, right[name]), name


def _deterministic(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    timing = {"tokens_per_second", "epoch_seconds"}
    return [{k: v for k, v in entry.items() if k not in timing} for entry in history]


# -- the fused loss ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 4, 13, 16, 1024])
def test_head_loss_equals_cross_entropy_in_value_and_gradient(chunk: int) -> None:
    """The chunked fused LM-head loss matches F.cross_entropy and its gradient."""
    generator = torch.Generator().manual_seed(chunk)
    hidden = torch.randn(13, 24, generator=generator) * 3
    weight = torch.randn(50, 24, generator=generator)
    labels = torch.randint(0, 50, (13,), generator=generator)
    mine = hidden.clone().requires_grad_(True)
    loss, correct = head_loss(mine, weight, labels, chunk=chunk)
    (loss * 2.5).backward()
    reference = hidden.clone().requires_grad_(True)
    logits = reference @ weight.T
    expected = F.cross_entropy(logits, labels)
    (expected * 2.5).backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    assert mine.grad is not None
    assert reference.grad is not None
    torch.testing.assert_close(mine.grad, reference.grad, rtol=1e-5, atol=1e-6)
    assert correct == int((logits.argmax(-1) == labels).sum())


def test_head_loss_without_gradient_gives_the_same_value() -> None:
    """Evaluation (no grad) computes the same loss and accuracy as training."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, 8, generator=generator)
    weight = torch.randn(30, 8, generator=generator)
    labels = torch.randint(0, 30, (9,), generator=generator)
    with torch.no_grad():
        loss, correct = head_loss(hidden, weight, labels, chunk=4)
    expected = F.cross_entropy(hidden @ weight.T, labels)
    torch.testing.assert_close(loss, expected)
    assert correct == int(((hidden @ weight.T).argmax(-1) == labels).sum())
    empty, hits = head_loss(hidden[:0], weight, labels[:0])
    assert float(empty) == 0.0
    assert hits == 0


def test_head_loss_reuses_one_buffer_across_calls_and_chunks() -> None:
    """A training loop's LogitsBuffer is written in place call after call (no fresh
    (rows, V) tensor per step), and the loss and gradient stay cross-entropy's."""
    scratch = LogitsBuffer()
    weight = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    held = None
    for rows in (13, 9, 11):  # the first call sizes it: later ones take its rows
        generator = torch.Generator().manual_seed(rows)
        hidden = torch.randn(rows, 8, generator=generator, requires_grad=True)
        labels = torch.randint(0, 40, (rows,), generator=generator)
        loss, _ = head_loss(hidden, weight, labels, chunk=5, scratch=scratch)
        loss.backward()
        reference = hidden.detach().clone().requires_grad_(True)
        expected = F.cross_entropy(reference @ weight.T, labels)
        expected.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(hidden.grad, reference.grad, rtol=1e-5, atol=1e-6)
        buffer = scratch.take(1, 40, hidden.device)
        assert held is None or buffer.data_ptr() == held
        held = buffer.data_ptr()


def test_head_loss_never_updates_the_frozen_weight() -> None:
    """The LM head gets no gradient even when its weight would accept one."""
    weight = torch.randn(30, 8, requires_grad=True)
    hidden = torch.randn(5, 8, requires_grad=True)
    loss, _ = head_loss(hidden, weight, torch.randint(0, 30, (5,)), chunk=2)
    loss.backward()
    assert weight.grad is None
    assert hidden.grad is not None


# -- batches and schedule ------------------------------------------------------------------


def test_batch_predicts_exactly_the_target_tokens(
    base: FrozenBase, toy_features: tuple[FeatureData, FeatureData]
) -> None:
    """Each loss row is the position before a target token and its label is that token."""
    train, _ = toy_features
    examples = train.examples[:3]
    layout = FeatureLayout.for_config(train, tiny_config(), base.num_layers)
    batch = make_batch(examples, layout.tap_indices, layout.final_index, torch.device("cpu"))
    width = max(len(e.input_ids) for e in examples)
    assert batch.final_state.shape == (3, width, base.hidden_size)
    assert batch.n_targets == sum(int(e.target_mask[1:].sum()) for e in examples)
    for row_index, label in zip(batch.loss_rows.tolist(), batch.labels.tolist(), strict=True):
        row, position = divmod(row_index, width)
        assert examples[row].target_mask[position + 1]
        assert examples[row].input_ids[position + 1] == label


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    """Linear warmup to the peak, cosine decay to min_lr_ratio of it."""
    config = TrainingConfig(learning_rate=1e-3, warmup_fraction=0.1, min_lr_ratio=0.1)
    rates = [lr_at(step, 100, config) for step in range(100)]
    assert rates[0] == pytest.approx(1e-4)
    assert rates[9] == pytest.approx(1e-3)
    assert max(rates) == pytest.approx(1e-3)
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))
    assert lr_at(100, 100, config) == pytest.approx(1e-4)


# -- the loop --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(tiny_config(), id="mix-final"),
        pytest.param(tiny_config(taps=(0, 1, -1), tap_mode="ladder"), id="ladder"),
    ],
)
def test_loss_decreases_on_a_small_set(
    base: FrozenBase, toy_features: tuple[FeatureData, FeatureData], config: CarryOnConfig
) -> None:
    """A few epochs on eight toy chats lower the training loss well below the base's."""
    train, valid = toy_features
    carry_on = new_carry_on(base, config)
    layout = FeatureLayout.for_config(train, config, base.num_layers)
    before = evaluate(carry_on, train, layout, base.head_weight)
    result = train_on_base(
        base,
        carry_on,
        train,
        TrainingConfig(epochs=6, batch_size=4, learning_rate=1e-2),
        valid_data=valid,
    )
    after = evaluate(result.carry_on, train, layout, base.head_weight)
    assert after["loss"] < 0.7 * before["loss"]
    losses = [entry["train_loss"] for entry in result.history]
    assert losses[-1] < losses[0]
    assert result.steps == 12
    assert len(result.history) == 6
    assert result.best_valid_loss == min(entry["valid_loss"] for entry in result.history)


def test_frozen_base_gets_no_gradient_and_is_unchanged_by_training() -> None:
    """After a training run every base parameter is frozen, gradient-free and unchanged."""
    base = tiny_base(seed=6)
    from customization.tokenizer import tokenize_examples

    tokenized = tokenize_examples(toy_examples(6), base.tokenizer, max_length=64)
    data = features_in_memory(base, tokenized, taps=(1, -1))
    before = {name: p.detach().clone() for name, p in base.model.named_parameters()}
    carry_on = new_carry_on(base, tiny_config(taps=(1, -1), tap_mode="ladder"))
    result = train_on_base(base, carry_on, data, TrainingConfig(epochs=2, batch_size=3))
    assert result.steps == 4
    for name, param in base.model.named_parameters():
        assert not param.requires_grad, name
        assert param.grad is None, name
        assert torch.equal(param, before[name]), name
    assert any(p.grad is not None for p in carry_on.parameters())


def test_training_reads_only_cached_features(
    base: FrozenBase, toy_features: tuple[FeatureData, FeatureData]
) -> None:
    """Training never calls the base backbone: it needs only the features and the head."""
    calls: list[int] = []
    handle = base.backbone.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        train_on_base(
            base, new_carry_on(base, tiny_config()), toy_features[0], TrainingConfig(epochs=1)
        )
    finally:
        handle.remove()
    assert calls == []


def test_callbacks_report_progress_metrics_and_checkpoints(
    base: FrozenBase, toy_features: tuple[FeatureData, FeatureData], tmp_path: Path
) -> None:
    """Progress every step, metrics every epoch, a checkpoint event for each checkpoint."""
    progress: list[dict[str, Any]] = []
    metrics: list[dict[str, Any]] = []
    checkpoints: list[int] = []
    callbacks = TrainingCallbacks(
        on_progress=progress.append,
        on_metrics=metrics.append,
        on_checkpoint=lambda step, info, _: checkpoints.append(step),
    )
    train, valid = toy_features
    carry_on = new_carry_on(base, tiny_config())
    train_on_base(
        base,
        carry_on,
        train,
        RESUMABLE,
        valid_data=valid,
        checkpoint_dir=tmp_path,
        callbacks=callbacks,
    )
    assert [p["step"] for p in progress] == list(range(1, 9))
    assert all(p["total_steps"] == 8 for p in progress)
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert {"train_loss", "valid_loss", "valid_token_accuracy"} <= metrics[0].keys()
    assert checkpoints == [2, 4, 6, 8]  # every 2 steps; 4 and 8 are epoch ends
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"step-{step:08d}" for step in (2, 4, 6, 8)
    ]


def test_cancel_stops_between_steps(
    base: FrozenBase, toy_features: tuple[FeatureData, FeatureData]
) -> None:
    """should_cancel returning True raises TrainingCancelled before the next step."""
    steps: list[int] = []
    callbacks = _cancel_after(3)
    callbacks.on_progress = lambda p: steps.append(p["step"])
    with pytest.raises(TrainingCancelled):
        train_on_base(
            base, new_carry_on(base, tiny_config()), toy_features[0], RESUMABLE, callbacks=callbacks
        )
    assert steps == [1, 2, 3]


@pytest.mark.parametrize(
    ("config", "stop_after", "latest"),
    [
        pytest.param(RESUMABLE, 3, 2, id="mid-epoch"),
        pytest.param(
            TrainingConfig(epochs=3, batch_size=4, learning_rate=1e-2, seed=5), 2, 2, id="epoch-end"
        ),
    ],
)
def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_run(
    base: FrozenBase,
    toy_features: tuple[FeatureData, FeatureData],
    tmp_path: Path,
    config: TrainingConfig,
    stop_after: int,
    latest: int,
) -> None:
    """Cancel after a checkpoint, resume with a fresh carry-on: weights equal bit for bit."""
    train, valid = toy_features
    shape = tiny_config(taps=(1, -1), tap_mode="ladder")

    def run(**options: Any) -> TrainingResult:
        carry_on = new_carry_on(base, shape, seed=9)
        return train_on_base(base, carry_on, train, config, valid_data=valid, **options)

    uninterrupted = run()
    folder = tmp_path / "checkpoints"
    with pytest.raises(TrainingCancelled):
        run(checkpoint_dir=folder, callbacks=_cancel_after(stop_after))
    newest = sorted(folder.iterdir())[-1]
    assert newest == checkpoint_path(folder, latest)
    resumed = run(checkpoint_dir=folder)
    _assert_same_weights(resumed.carry_on, uninterrupted.carry_on)
    assert resumed.steps == uninterrupted.steps
    assert resumed.trained_tokens == uninterrupted.trained_tokens
    assert resumed.best_epoch == uninterrupted.best_epoch
    assert resumed.best_valid_loss == uninterrupted.best_valid_loss
    assert _deterministic(resumed.history) == _deterministic(uninterrupted.history)


def test_resume_ignores_a_checkpoint_left_half_written(
    base: FrozenBase, toy_features: tuple[FeatureData, FeatureData], tmp_path: Path
) -> None:
    """A checkpoint folder without its trainer state (a crash mid-write) is discarded."""
    train, _ = toy_features

    def run(**options: Any) -> TrainingResult:
        carry_on = new_carry_on(base, tiny_config(), seed=2)
        return train_on_base(base, carry_on, train, RESUMABLE, **options)

    reference = run()
    with pytest.raises(TrainingCancelled):
        run(checkpoint_dir=tmp_path, callbacks=_cancel_after(5))
    half_written = checkpoint_path(tmp_path, 6)
    half_written.mkdir()
    (half_written / "carry_on.safetensors").write_bytes(b"partial")
    resumed = run(checkpoint_dir=tmp_path)
    _assert_same_weights(resumed.carry_on, reference.carry_on)
    state = json.loads((checkpoint_path(tmp_path, 6) / "trainer_state.json").read_text())
    assert state["step"] == 6


def test_early_stopping_keeps_the_best_weights(
    base: FrozenBase, toy_features: tuple[FeatureData, FeatureData]
) -> None:
    """With patience, a run whose validation loss stops improving ends early on its best."""
    train, valid = toy_features
    carry_on = new_carry_on(base, tiny_config())
    config = TrainingConfig(epochs=40, batch_size=8, learning_rate=0.5, early_stopping_patience=1)
    result = train_on_base(base, carry_on, train, config, valid_data=valid)
    assert result.stopped_early
    layout = FeatureLayout.for_config(valid, carry_on.config, base.num_layers)
    score = evaluate(result.carry_on, valid, layout, base.head_weight, batch_size=8)
    assert score["loss"] == pytest.approx(result.best_valid_loss)
    assert result.best_epoch == len(result.history) - 1


def test_training_refuses_features_without_the_carry_on_taps(
    base: FrozenBase, toy_features: tuple[FeatureData, FeatureData]
) -> None:
    """A carry-on tapping a layer the features do not hold is a clear ArtifactError."""
    train, _ = toy_features
    features_without = FeatureData(train.examples, [(0, 5), (0, 1), (0, 2)], train.state_sizes)
    with pytest.raises(ArtifactError, match="no hidden state 0"):
        train_on_base(
            base,
            new_carry_on(base, tiny_config(taps=(0, -1))),
            features_without,
            TrainingConfig(epochs=1),
        )


# -- continued fine-tuning -------------------------------------------------------------------


def _first_batch(data: FeatureData, config: TrainingConfig) -> FeatureData:
    """The examples of a run's first step (epoch 0's order, as train_adapter draws it)."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(config.seed * 1000))
    picked = [data.examples[i] for i in order.tolist()[: config.batch_size]]
    return FeatureData(picked, data.states, data.state_sizes)


def _parent_and_child(
    base: FrozenBase, kind: str, tmp_path: Path
) -> tuple[Trainable, Trainable, ArtifactInfo]:
    """A saved parent whose weights are off the initialisation, and a fresh child."""
    if kind == "tail":
        shape: CarryOnConfig | TailConfig = TailConfig(depth=2, rank=4)
        tail = build_adapter(base, shape, seed=1)
        assert isinstance(tail, TailModel)
        parent: Trainable = perturb_tail(tail, seed=1, scale=0.3)
    else:
        shape = tiny_config(taps=(1, -1), tap_mode="ladder")
        parent = perturb(new_carry_on(base, shape, seed=1), seed=1, scale=0.2)
    info = save_adapter(parent, tmp_path / "parent", base_fingerprints=[base.fingerprint()])
    return parent, build_adapter(base, shape, seed=8), info


@pytest.mark.parametrize("kind", ["carry_on", "tail"])
def test_a_continued_run_starts_from_the_parent_weights(
    base: FrozenBase, toy_features: tuple[FeatureData, FeatureData], tmp_path: Path, kind: str
) -> None:
    """With the parent's checked weights, the first step's loss is the parent's loss on that
    batch; a run from scratch starts elsewhere (at the base's loss)."""
    train, _ = toy_features
    parent, child, info = _parent_and_child(base, kind, tmp_path)
    weights = load_initial_weights(
        info.path,
        config=child.config,
        base_fingerprints=[base.fingerprint()],
        expected_sha256=info.sha256,
    )
    config = TrainingConfig(epochs=1, batch_size=4, learning_rate=1e-2, seed=3)
    layout = FeatureLayout.for_model(train, parent, base.num_layers)
    first = _first_batch(train, config)
    expected = evaluate(parent, first, layout, base.head_weight, batch_size=4)["loss"]

    def first_step_loss(model: Trainable, initial: dict[str, torch.Tensor] | None) -> float:
        losses: list[float] = []
        on_progress = TrainingCallbacks(on_progress=lambda p: losses.append(p["train_loss"]))
        train_on_base(base, model, train, config, callbacks=on_progress, initial_weights=initial)
        return losses[0]

    assert first_step_loss(child, weights) == pytest.approx(expected, rel=1e-6)
    from_scratch = first_step_loss(build_adapter(base, child.config, seed=8), None)
    base_loss = evaluate(None, first, FeatureLayout.for_taps(train, [-1], 2), base.head_weight)
    assert from_scratch == pytest.approx(base_loss["loss"], rel=1e-5)
    assert abs(from_scratch - expected) > 1e-3


def test_initial_weights_are_checked_like_any_artifact_load(
    base: FrozenBase, other_base: FrozenBase, tmp_path: Path
) -> None:
    """A changed artifact, another base, another shape or another kind is refused, naming why."""
    _, child, info = _parent_and_child(base, "carry_on", tmp_path)
    good = {
        "config": child.config,
        "base_fingerprints": [base.fingerprint()],
        "expected_sha256": info.sha256,
    }
    with pytest.raises(ArtifactError, match="sha256"):
        load_initial_weights(info.path, **{**good, "expected_sha256": "0" * 64})
    with pytest.raises(IncompatibleBaseModelError):
        load_initial_weights(info.path, **{**good, "base_fingerprints": [other_base.fingerprint()]})
    wider = tiny_config(taps=(1, -1), tap_mode="ladder", d_model=32)
    with pytest.raises(ArtifactError, match="another d_model"):
        load_initial_weights(info.path, **{**good, "config": wider})
    with pytest.raises(ArtifactError, match="another kind"):
        load_initial_weights(info.path, **{**good, "config": TailConfig(depth=2, rank=4)})
    wrong = {k: torch.zeros(1) for k in child.state_dict()}
    empty = FeatureData([], [(0, 1), (0, 2)], [32, 32])
    with pytest.raises(ArtifactError, match="do not fit"):
        train_on_base(base, child, empty, TrainingConfig(epochs=1), initial_weights=wrong)
