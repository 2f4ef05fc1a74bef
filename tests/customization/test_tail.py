"""The tail adapter: the base's top k layers with LoRA, trained from a cached state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from customization.base_model import FrozenBase, load_base_model
from customization.checkpoint import (
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    TAIL_FILE,
    artifact_sha256,
    load_adapter,
    load_tail_adapter,
    load_tail_weights,
    save_tail,
)
from customization.config import TailConfig, TrainingConfig
from customization.errors import ArtifactError, IncompatibleBaseModelError, TrainingCancelled
from customization.features import FeatureData
from customization.tail import TailAdapter, TailModel, load_tail, load_tail_parts
from customization.training import (
    FeatureLayout,
    TrainingCallbacks,
    TrainingResult,
    build_adapter,
    evaluate,
)
from tests.helpers.carry_on_kit import RESUMABLE, perturb_tail, train_on_base


def _tail(base: FrozenBase, depth: int, *, seed: int = 0) -> TailModel:
    tail = build_adapter(base, TailConfig(depth=depth, rank=4), seed=seed)
    assert isinstance(tail, TailModel)
    return tail


def _logits(base: FrozenBase, tail: TailModel, ids: torch.Tensor) -> torch.Tensor:
    (state,) = base.hidden_states(ids, None, [tail.config.first_layer])
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        return base.logits(tail(state, positions))


@pytest.mark.parametrize("depth", [1, 2])
def test_a_tail_of_any_depth_at_initialisation_gives_the_base_logits(
    base: FrozenBase, depth: int
) -> None:
    """B starts at zero: the base's top layers re-run from the cached state are the base."""
    ids = torch.tensor([[5, 17, 40, 99, 23, 7, 61]])
    expected = base.logits(base.hidden_states(ids, None, [-1])[0])
    got = _logits(base, _tail(base, depth), ids)
    assert (got - expected).abs().max() < 1e-5


def test_rows_packed_without_their_padding_compute_what_padded_rows_do(base: FrozenBase) -> None:
    """The trainer runs a tail on the real tokens only (``packed.Sequences``): the states at
    real positions and the LoRA gradients equal the padded batch's; pads come back zero."""
    tail = perturb_tail(_tail(base, 2), seed=1, scale=0.3)
    assert tail.packs
    ids = torch.randint(1, 90, (3, 7), generator=torch.Generator().manual_seed(0))
    (states,) = base.hidden_states(ids, None, [tail.config.first_layer])
    positions = torch.arange(7).unsqueeze(0).expand(3, -1)
    lengths = torch.tensor([7, 3, 5])
    real = positions < lengths[:, None]
    weights = torch.randn(states.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for given in (None, lengths):
        tail.zero_grad()
        out = tail(states, positions, given)
        (out[real] * weights[real]).sum().backward()
        grads = [p.grad.clone() for p in tail.parameters() if p.requires_grad]
        results.append((out.detach(), grads))
    (padded, padded_grads), (packed_out, packed_grads) = results
    torch.testing.assert_close(packed_out[real], padded[real], rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(packed_out[~real]) == 0
    for mine, theirs in zip(packed_grads, padded_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6)


def test_only_lora_parameters_get_gradients(
    base: FrozenBase, toy_features: tuple[FeatureData, FeatureData]
) -> None:
    """Training touches the LoRA matrices only; the copied base layers stay frozen."""
    tail = _tail(base, 2)
    frozen = {n: p.detach().clone() for n, p in tail.named_parameters() if not p.requires_grad}
    train_on_base(
        base,
        tail,
        toy_features[0],
        TrainingConfig(epochs=1, batch_size=4, learning_rate=1e-2),
    )
    trainable = {n for n, p in tail.named_parameters() if p.requires_grad}
    assert trainable
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    for name, parameter in tail.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name
    assert all(not p.requires_grad for p in base.model.parameters())


def test_a_tail_learns_on_the_cached_state(
    base: FrozenBase, toy_features: tuple[FeatureData, FeatureData]
) -> None:
    """After training, the training loss is well below the base's own on the same data."""
    train, _ = toy_features
    tail = _tail(base, 1)
    base_loss = evaluate(None, train, FeatureLayout.for_taps(train, [-1], 2), base.head_weight)
    result = train_on_base(
        base,
        tail,
        train,
        TrainingConfig(epochs=4, batch_size=2, learning_rate=2e-2),
    )
    layout = FeatureLayout.for_tail(train, tail.config)
    assert evaluate(result.carry_on, train, layout, base.head_weight)["loss"] < base_loss["loss"]


def test_save_then_load_is_exact(base: FrozenBase, tmp_path: Path) -> None:
    """A saved tail, loaded for training or for serving, holds exactly the same weights."""
    tail = perturb_tail(_tail(base, 2), seed=1, scale=0.3)
    info = save_tail(tail, tmp_path / "tail", base_fingerprints=[base.fingerprint()])
    assert sorted(p.name for p in info.path.iterdir()) == sorted(
        [PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, TAIL_FILE]
    )
    assert artifact_sha256(info.path) == info.sha256
    fresh = _tail(base, 2, seed=9)
    load_tail_weights(fresh, info.path)
    ids = torch.tensor([[3, 8, 13, 21, 34]])
    assert torch.equal(_logits(base, fresh, ids), _logits(base, tail, ids))
    served = load_adapter(
        info.path, base_fingerprints=[base.fingerprint()], expected_sha256=info.sha256
    )
    assert isinstance(served, TailAdapter)
    for layer, name, module in tail.lora_modules():
        a, b = served.weights[(layer, name)]
        assert torch.equal(a, module.lora_A.weight)
        assert torch.equal(b, module.lora_B.weight)


def test_a_tail_for_another_base_is_refused(
    base: FrozenBase, other_base: FrozenBase, tmp_path: Path
) -> None:
    """Loading a tail on a base with another fingerprint names both bases."""
    info = save_tail(_tail(base, 1), tmp_path / "tail", base_fingerprints=[base.fingerprint()])
    with pytest.raises(IncompatibleBaseModelError, match="this tail was trained on base 'tiny'"):
        load_tail_adapter(info.path, base_fingerprints=[other_base.fingerprint()])


def test_a_changed_tail_artifact_is_refused(base: FrozenBase, tmp_path: Path) -> None:
    """A byte changed in the weights no longer matches the recorded sha256."""
    info = save_tail(_tail(base, 1), tmp_path / "tail", base_fingerprints=[base.fingerprint()])
    weights = info.path / PEFT_WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_tail_adapter(info.path, expected_sha256=info.sha256)


def test_training_resumes_to_the_same_weights(
    base: FrozenBase, toy_features: tuple[FeatureData, FeatureData], tmp_path: Path
) -> None:
    """Cancel after a checkpoint, resume with a fresh tail: the LoRA weights equal bit for bit."""
    train, valid = toy_features

    def run(folder: Path, callbacks: TrainingCallbacks | None = None) -> TrainingResult:
        return train_on_base(
            base,
            _tail(base, 2),
            train,
            RESUMABLE,
            valid_data=valid,
            checkpoint_dir=folder,
            callbacks=callbacks,
        )

    uninterrupted = run(tmp_path / "a")
    steps = {"n": 0}

    def cancel() -> bool:
        steps["n"] += 1
        return steps["n"] > 5

    with pytest.raises(TrainingCancelled):
        run(tmp_path / "b", TrainingCallbacks(should_cancel=cancel))
    resumed = run(tmp_path / "b")
    assert isinstance(resumed.carry_on, TailModel)
    assert isinstance(uninterrupted.carry_on, TailModel)
    mine, theirs = resumed.carry_on.lora_state_dict(), uninterrupted.carry_on.lora_state_dict()
    assert all(torch.equal(mine[key], theirs[key]) for key in theirs)
    assert resumed.best_valid_loss == uninterrupted.best_valid_loss


def test_a_training_node_reads_only_the_layers_of_the_tail(hf_base_dir: Path) -> None:
    """load_tail reads the top k layers, the norm and the head, never a layer below."""
    parts = load_tail_parts(hf_base_dir, 1)
    assert parts.loaded_keys, "nothing was read"
    assert not [k for k in parts.loaded_keys if k.startswith("model.layers.0.")]
    assert [k for k in parts.loaded_keys if k.startswith("model.layers.1.")]
    assert len(parts.layers) == 1
    base = load_base_model(hf_base_dir)
    tail, head = load_tail(hf_base_dir, TailConfig(depth=1, rank=4), seed=0)
    assert torch.equal(head, base.head_weight)
    ids = torch.tensor([[4, 9, 16, 25, 36, 49]])
    expected = base.logits(base.hidden_states(ids, None, [-1])[0])
    assert (_logits(base, tail, ids) - expected).abs().max() < 1e-5
