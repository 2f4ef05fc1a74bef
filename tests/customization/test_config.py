import json
from typing import Any

import pytest

from customization.config import (
    FORMAT_VERSION,
    CarryOnConfig,
    FeatureConfig,
    GenerationConfig,
    TrainingConfig,
)

OUT_OF_RANGE = [
    pytest.param(CarryOnConfig, "d_model", 4, id="carry_on-d_model"),
    pytest.param(CarryOnConfig, "n_blocks", 0, id="carry_on-n_blocks"),
    pytest.param(CarryOnConfig, "n_heads", 0, id="carry_on-n_heads"),
    pytest.param(CarryOnConfig, "mlp_ratio", 0.1, id="carry_on-mlp_ratio"),
    pytest.param(CarryOnConfig, "alpha", -1.0, id="carry_on-alpha"),
    pytest.param(CarryOnConfig, "dropout", 0.95, id="carry_on-dropout"),
    pytest.param(CarryOnConfig, "gate_bias_init", 50.0, id="carry_on-gate_bias_init"),
    pytest.param(CarryOnConfig, "taps", (), id="carry_on-taps-empty"),
    pytest.param(CarryOnConfig, "taps", (-1, -1), id="carry_on-taps-repeated"),
    pytest.param(CarryOnConfig, "tap_mode", "sum", id="carry_on-tap_mode"),
    pytest.param(CarryOnConfig, "tap_sizes", (32, 32), id="carry_on-tap_sizes"),
    pytest.param(CarryOnConfig, "tap_bases", (0, 1), id="carry_on-tap_bases"),
    pytest.param(FeatureConfig, "max_length", 4, id="feature-max_length"),
    pytest.param(FeatureConfig, "storage_dtype", "bfloat8", id="feature-storage_dtype"),
    pytest.param(FeatureConfig, "batch_size", 0, id="feature-batch_size"),
    pytest.param(FeatureConfig, "shard_examples", 0, id="feature-shard_examples"),
    pytest.param(FeatureConfig, "taps", (), id="feature-taps"),
    pytest.param(TrainingConfig, "epochs", 0, id="training-epochs"),
    pytest.param(TrainingConfig, "batch_size", 0, id="training-batch_size"),
    pytest.param(TrainingConfig, "learning_rate", 2.0, id="training-learning_rate"),
    pytest.param(TrainingConfig, "weight_decay", -0.1, id="training-weight_decay"),
    pytest.param(TrainingConfig, "warmup_fraction", 0.9, id="training-warmup_fraction"),
    pytest.param(TrainingConfig, "min_lr_ratio", 1.5, id="training-min_lr_ratio"),
    pytest.param(TrainingConfig, "grad_clip", -1.0, id="training-grad_clip"),
    pytest.param(TrainingConfig, "checkpoint_every", -1, id="training-checkpoint_every"),
    pytest.param(TrainingConfig, "early_stopping_patience", -1, id="training-patience"),
    pytest.param(TrainingConfig, "loss_chunk_tokens", 8, id="training-loss_chunk_tokens"),
    pytest.param(GenerationConfig, "max_new_tokens", 0, id="generation-max_new_tokens"),
    pytest.param(GenerationConfig, "temperature", 2.5, id="generation-temperature"),
    pytest.param(GenerationConfig, "top_p", 0.0, id="generation-top_p-zero"),
    pytest.param(GenerationConfig, "top_p", 1.5, id="generation-top_p"),
    pytest.param(GenerationConfig, "top_k", -1, id="generation-top_k"),
    pytest.param(GenerationConfig, "repetition_penalty", 0.0, id="generation-penalty"),
    pytest.param(GenerationConfig, "stop", ("a", "b", "c", "d", "e"), id="generation-stop-many"),
    pytest.param(GenerationConfig, "stop", ("",), id="generation-stop-empty"),
]


@pytest.mark.parametrize(("config_class", "field", "value"), OUT_OF_RANGE)
def test_out_of_range_values_raise_value_error_naming_the_field(
    config_class: type, field: str, value: object
) -> None:
    """Each config rejects an invalid value with a ValueError that names the field."""
    with pytest.raises(ValueError, match=field):
        config_class(**{field: value})


@pytest.mark.parametrize(("d_model", "n_heads"), [(16, 3), (24, 8)])
def test_carry_on_config_rejects_heads_that_do_not_split_width_evenly(
    d_model: int, n_heads: int
) -> None:
    """d_model must split into n_heads heads of even size (RoPE rotates pairs)."""
    with pytest.raises(ValueError, match="d_model"):
        CarryOnConfig(d_model=d_model, n_heads=n_heads)


def test_ladder_feeds_one_tap_per_block_while_taps_do_not_outnumber_blocks() -> None:
    """Up to k ladder taps, tap j + 1 enters block j (the original ladder, unchanged)."""
    assert CarryOnConfig(n_blocks=4, taps=(-1, 8, 16), tap_mode="ladder").ladder_blocks == (0, 1)
    assert CarryOnConfig(n_blocks=2, taps=(4, 8, -1), tap_mode="ladder").ladder_blocks == (0, 1)
    assert CarryOnConfig(n_blocks=2, taps=(-1,), tap_mode="ladder").ladder_blocks == ()


def test_ladder_splits_more_taps_than_blocks_into_contiguous_groups() -> None:
    """Seven ladder taps over four blocks: two, two, two, one; earlier taps to earlier blocks."""
    config = CarryOnConfig(n_blocks=4, taps=(-1, 4, 8, 12, 16, 20, 24, 27), tap_mode="ladder")
    assert config.ladder_blocks == (0, 0, 1, 1, 2, 2, 3)
    two = CarryOnConfig(n_blocks=2, taps=(-1, 4, 8, 12, 16, 20, 24, 27), tap_mode="ladder")
    assert two.ladder_blocks == (0, 0, 0, 0, 1, 1, 1)


def test_same_tap_index_on_different_bases_is_not_a_repeat() -> None:
    """Tap -1 of base 0 and tap -1 of base 1 are two distinct taps."""
    config = CarryOnConfig(taps=(-1, -1), tap_bases=(0, 1))
    assert config.n_bases == 2
    assert CarryOnConfig(taps=(-1, 8)).resolved_tap_bases == (0, 0)


ROUND_TRIP = [
    pytest.param(
        CarryOnConfig(
            d_model=64,
            n_blocks=3,
            n_heads=2,
            taps=(8, 16, -1),
            tap_bases=(0, 0, 1),
            tap_sizes=(32, 32, 48),
            tap_mode="ladder",
            hidden_size=32,
            alpha=0.5,
            dropout=0.1,
        ),
        id="carry_on",
    ),
    pytest.param(
        FeatureConfig(taps=(3, -1), max_length=64, storage_dtype="int8", batch_size=2),
        id="feature",
    ),
    pytest.param(
        TrainingConfig(epochs=2, learning_rate=2e-3, checkpoint_every=5, seed=7), id="training"
    ),
    pytest.param(
        GenerationConfig(max_new_tokens=9, temperature=0.7, top_k=5, seed=3, stop=("##", "\n")),
        id="generation",
    ),
]


@pytest.mark.parametrize("config", ROUND_TRIP)
def test_to_dict_from_dict_round_trip_is_exact(config: Any) -> None:
    """from_dict(to_dict(c)) == c, also after a JSON round trip (tuples become lists)."""
    data = config.to_dict()
    assert data["format_version"] == FORMAT_VERSION
    assert type(config).from_dict(data) == config
    assert type(config).from_dict(json.loads(json.dumps(data))) == config


@pytest.mark.parametrize("config", ROUND_TRIP)
def test_unknown_keys_are_dropped_with_a_warning(config: Any) -> None:
    """Keys from a newer version are ignored with a warning that names them."""
    data = {**config.to_dict(), "from_the_future": 1}
    with pytest.warns(UserWarning, match="from_the_future"):
        loaded = type(config).from_dict(data)
    assert loaded == config


def test_newer_carry_on_format_version_warns() -> None:
    """A carry-on config written by a newer format version loads with a warning."""
    with pytest.warns(UserWarning, match="newer"):
        CarryOnConfig(format_version=FORMAT_VERSION + 1)


def test_resolved_fills_in_base_dependent_sizes() -> None:
    """resolved() sets the tap widths and the merge width, leaving the rest alone."""
    config = CarryOnConfig(taps=(4, -1)).resolved(tap_sizes=(32, 32), hidden_size=32)
    assert (config.tap_sizes, config.hidden_size, config.taps) == ((32, 32), 32, (4, -1))


def test_generation_config_is_greedy_only_at_temperature_zero() -> None:
    """temperature 0 means greedy decoding; any other temperature samples."""
    assert GenerationConfig(temperature=0.0).greedy
    assert not GenerationConfig(temperature=0.3).greedy


def test_a_config_written_with_the_old_defaults_keeps_its_shape() -> None:
    """An artifact from before the ladder default (final tap, mix, 1e-3) loads as it was."""
    old = {"d_model": 128, "n_blocks": 2, "taps": [-1], "tap_mode": "mix", "format_version": 1}
    config = CarryOnConfig.from_dict(old)
    assert (config.taps, config.tap_mode, config.ladder_blocks) == ((-1,), "mix", ())
