from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from customization.base_model import FrozenBase
from customization.config import FeatureConfig
from customization.errors import ArtifactError, IncompatibleBaseModelError, TrainingCancelled
from customization.features import (
    FeatureSet,
    extract_features,
    feature_cache_key,
    quantize_rows,
    stored_states,
)
from customization.tokenizer import ChatTokenizer, TokenizedExample
from tests.helpers.carry_on_kit import lively_base
from tests.helpers.tiny_models import tiny_tokenizer

FLOAT32 = FeatureConfig(taps=(1, -1), max_length=64, storage_dtype="float32", batch_size=4)


@contextmanager
def count_base_forwards(base: FrozenBase) -> Iterator[list[int]]:
    """Count calls of the base's backbone while the block runs."""
    calls: list[int] = []
    handle = base.backbone.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        handle.remove()


def test_second_extraction_of_the_same_key_runs_no_base_forward(
    base: FrozenBase, toy_tokenized: list[TokenizedExample], tmp_path: Path
) -> None:
    """A cache hit opens the stored feature set without calling the base at all."""
    with count_base_forwards(base) as calls:
        first = extract_features(base, toy_tokenized, FLOAT32, cache_dir=tmp_path, key="k")
    assert first.extracted
    assert len(calls) == 3
    with count_base_forwards(base) as calls:
        second = extract_features(base, toy_tokenized, FLOAT32, cache_dir=tmp_path, key="k")
    assert len(calls) == 0
    assert not second.extracted
    assert second.path == first.path
    assert second.manifest == first.manifest


def test_stored_states_equal_the_base_hidden_states_of_each_example_alone(
    base: FrozenBase, toy_tokenized: list[TokenizedExample], tmp_path: Path
) -> None:
    """Padded batches store, per example, exactly what the base computes for it alone."""
    feature_set = extract_features(base, toy_tokenized, FLOAT32, cache_dir=tmp_path, key="k")
    data = feature_set.load()
    assert data.states == [(0, 1), (0, 2)]
    assert data.state_sizes == [32, 32]
    assert feature_set.n_examples == 12
    assert len(data) == 12
    assert feature_set.n_tokens == sum(len(e.input_ids) for e in toy_tokenized)
    assert data.n_target_tokens == sum(e.n_targets for e in toy_tokenized)
    for stored, example in zip(data.examples, toy_tokenized, strict=True):
        assert stored.input_ids.tolist() == example.input_ids
        assert stored.target_mask.long().tolist() == example.target_mask
        alone = base.hidden_states(torch.tensor([example.input_ids]), None, [1, -1])
        for state, expected in zip(stored.states, alone, strict=True):
            torch.testing.assert_close(state.dequantize(), expected[0], rtol=1e-5, atol=1e-5)


def test_loading_a_subset_of_states_gives_those_states_only(
    base: FrozenBase, toy_tokenized: list[TokenizedExample], tmp_path: Path
) -> None:
    """load(states=...) holds just the asked states, equal to the same states of a full load."""
    config = FeatureConfig(taps=(0, 1, -1), max_length=64, storage_dtype="int8", batch_size=4)
    feature_set = extract_features(base, toy_tokenized, config, cache_dir=tmp_path, key="k")
    full = feature_set.load()
    subset = feature_set.load(states=[(0, 2), (0, 0)])
    assert subset.states == [(0, 2), (0, 0)]
    assert subset.state_sizes == [32, 32]
    for every, some in zip(full.examples, subset.examples, strict=True):
        assert len(some.states) == 2
        assert torch.equal(some.input_ids, every.input_ids)
        assert torch.equal(some.states[0].dequantize(), every.states[2].dequantize())
        assert torch.equal(some.states[1].dequantize(), every.states[0].dequantize())
    with pytest.raises(IncompatibleBaseModelError, match="holds no hidden state 5"):
        feature_set.load(states=[(0, 5)])


def test_int8_storage_dequantizes_within_a_small_relative_error(
    base: FrozenBase, toy_tokenized: list[TokenizedExample], tmp_path: Path
) -> None:
    """The int8 bridge stores per-row scales; dequantized states are within 1% of float32."""
    int8 = FeatureConfig(taps=(1, -1), max_length=64, storage_dtype="int8", batch_size=4)
    exact = extract_features(base, toy_tokenized, FLOAT32, cache_dir=tmp_path, key="f32")
    small = extract_features(base, toy_tokenized, int8, cache_dir=tmp_path, key="i8")
    assert small.nbytes < exact.nbytes / 2
    for a, b in zip(exact.load().examples, small.load().examples, strict=True):
        for reference, quantized in zip(a.states, b.states, strict=True):
            assert quantized.values.dtype == torch.int8
            assert quantized.scale is not None
            error = (quantized.dequantize() - reference.values).norm(dim=-1)
            assert (error / reference.values.norm(dim=-1)).max() < 1e-2


def test_quantize_rows_error_is_at_most_half_a_step() -> None:
    """Symmetric per-row int8: every value is within scale / 2 of the original."""
    states = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * 7
    values, scale = quantize_rows(states)
    assert values.dtype == torch.int8
    assert scale.shape == (6,)
    assert values.abs().max() <= 127
    restored = values.float() * scale.unsqueeze(-1)
    assert ((restored - states).abs() <= scale.unsqueeze(-1) / 2 + 1e-6).all()


def test_float16_is_the_default_storage(
    base: FrozenBase, toy_tokenized: list[TokenizedExample], tmp_path: Path
) -> None:
    """By default states are stored in fp16 and dequantize to float32."""
    config = FeatureConfig(taps=(-1,), max_length=64)
    data = extract_features(base, toy_tokenized[:2], config, cache_dir=tmp_path, key="k").load()
    state = data.examples[0].states[0]
    assert state.values.dtype == torch.float16
    assert state.dequantize().dtype == torch.float32


def test_different_keys_use_different_folders(
    base: FrozenBase, toy_tokenized: list[TokenizedExample], tmp_path: Path
) -> None:
    """Each cache key gets its own folder; the key covers taps, length, dtype and bases."""
    keys = {
        feature_cache_key(base_keys=["b"], dataset_sha256="d", config=FLOAT32),
        feature_cache_key(base_keys=["b"], dataset_sha256="e", config=FLOAT32),
        feature_cache_key(base_keys=["c"], dataset_sha256="d", config=FLOAT32),
        feature_cache_key(
            base_keys=["b"], dataset_sha256="d", config=FeatureConfig(taps=(-1,), max_length=64)
        ),
    }
    assert len(keys) == 4
    first, second = sorted(keys)[:2]
    a = extract_features(base, toy_tokenized[:2], FLOAT32, cache_dir=tmp_path, key=first)
    b = extract_features(base, toy_tokenized[2:4], FLOAT32, cache_dir=tmp_path, key=second)
    assert a.path != b.path
    assert a.extracted
    assert b.extracted
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first, second])


def test_cancelled_extraction_leaves_no_folder_behind(
    base: FrozenBase, toy_tokenized: list[TokenizedExample], tmp_path: Path
) -> None:
    """Cancelling midway raises TrainingCancelled and leaves neither the key nor staging."""
    polls: list[int] = []

    def cancel() -> bool:
        polls.append(1)
        return len(polls) > 2  # after two of three batches

    config = FeatureConfig(taps=(-1,), max_length=64, batch_size=4, shard_examples=8)
    with pytest.raises(TrainingCancelled):
        extract_features(base, toy_tokenized, config, cache_dir=tmp_path, key="k", cancel=cancel)
    assert len(polls) == 3
    assert list(tmp_path.iterdir()) == []
    # A later, uncancelled run of the same key extracts from scratch.
    feature_set = extract_features(base, toy_tokenized, config, cache_dir=tmp_path, key="k")
    assert feature_set.extracted
    assert feature_set.n_examples == 12
    assert len(feature_set.manifest["shards"]) == 2


def test_progress_reports_examples_done_per_shard(
    base: FrozenBase, toy_tokenized: list[TokenizedExample], tmp_path: Path
) -> None:
    """The progress callback sees (done, total) after every shard."""
    seen: list[tuple[int, int]] = []
    config = FeatureConfig(taps=(-1,), max_length=64, shard_examples=5)
    extract_features(
        base,
        toy_tokenized,
        config,
        cache_dir=tmp_path,
        key="k",
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen == [(5, 12), (10, 12), (12, 12)]


def test_cached_features_of_another_base_are_refused(
    base: FrozenBase,
    other_base: FrozenBase,
    toy_tokenized: list[TokenizedExample],
    tmp_path: Path,
) -> None:
    """Opening a cached key with a different base is an IncompatibleBaseModelError."""
    extract_features(base, toy_tokenized[:2], FLOAT32, cache_dir=tmp_path, key="k")
    with pytest.raises(IncompatibleBaseModelError, match="different base"):
        extract_features(other_base, toy_tokenized[:2], FLOAT32, cache_dir=tmp_path, key="k")


def test_multi_base_extraction_stores_each_base_tap(
    base: FrozenBase,
    other_base: FrozenBase,
    toy_tokenized: list[TokenizedExample],
    tmp_path: Path,
) -> None:
    """Two bases sharing a tokenizer: each tap comes from its base, plus base 0's final."""
    config = FeatureConfig(taps=(1, -1), max_length=64, storage_dtype="float32")
    feature_set = extract_features(
        [base, other_base], toy_tokenized[:3], config, cache_dir=tmp_path, key="k", tap_bases=(1, 1)
    )
    assert feature_set.states == [(1, 1), (1, 2), (0, 2)]
    example = toy_tokenized[0]
    ids = torch.tensor([example.input_ids])
    stored = feature_set.load().examples[0].states
    expected = [
        other_base.hidden_states(ids, None, [1])[0],
        other_base.hidden_states(ids, None, [-1])[0],
        base.hidden_states(ids, None, [-1])[0],
    ]
    for state, reference in zip(stored, expected, strict=True):
        torch.testing.assert_close(state.values, reference[0], rtol=1e-5, atol=1e-5)


def test_multi_base_with_different_tokenizers_is_refused(
    base: FrozenBase, toy_tokenized: list[TokenizedExample], tmp_path: Path
) -> None:
    """Bases mixed in one carry-on must share one tokenizer; the error names them."""
    stranger = lively_base(seed=4, name="stranger")
    backend = tiny_tokenizer().tokenizer
    backend.add_special_tokens(["<|tool|>"])
    stranger.tokenizer = ChatTokenizer(
        backend, chat_template=base.tokenizer.chat_template, eos_token="<|im_end|>"
    )
    with pytest.raises(IncompatibleBaseModelError, match="share one tokenizer") as caught:
        extract_features(
            [base, stranger], toy_tokenized, FLOAT32, cache_dir=tmp_path, key="k", tap_bases=(1, 0)
        )
    assert "stranger" in caught.value.message
    assert not (tmp_path / "k").exists()


def test_stored_states_lists_every_tap_and_the_final_state_once() -> None:
    """The final state is stored once, whether or not it is also a tap."""
    assert stored_states([1, 2], [0, 0], 2) == [(0, 1), (0, 2)]
    assert stored_states([1], [0], 2) == [(0, 1), (0, 2)]
    assert stored_states([2, 2], [1, 0], 2) == [(1, 2), (0, 2)]


def test_opening_a_folder_without_a_manifest_is_an_artifact_error(tmp_path: Path) -> None:
    """FeatureSet.open refuses a folder that holds no feature set."""
    with pytest.raises(ArtifactError, match="no feature set"):
        FeatureSet.open(tmp_path)


def test_an_unreadable_shard_is_an_artifact_error(
    base: FrozenBase, toy_tokenized: list[TokenizedExample], tmp_path: Path
) -> None:
    """A damaged shard file is reported as an ArtifactError when loaded."""
    feature_set = extract_features(base, toy_tokenized[:2], FLOAT32, cache_dir=tmp_path, key="k")
    (feature_set.path / feature_set.manifest["shards"][0]).write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="unreadable"):
        FeatureSet.open(feature_set.path).load()
