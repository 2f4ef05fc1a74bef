import json
from pathlib import Path

import pytest
import torch

from customization.base_model import FrozenBase
from customization.carry_on import CarryOn
from customization.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    artifact_sha256,
    load_carry_on,
    read_artifact_config,
    save_carry_on,
)
from customization.errors import ArtifactError, IncompatibleBaseModelError
from tests.helpers.carry_on_kit import new_carry_on, perturb, tiny_config


@pytest.fixture
def carry_on(base: FrozenBase) -> CarryOn:
    """A ladder carry-on away from its init, so a lost tensor would show."""
    return perturb(new_carry_on(base, tiny_config(taps=(1, -1), tap_mode="ladder")), seed=7)


def _logits(base: FrozenBase, carry_on: CarryOn) -> torch.Tensor:
    ids = torch.tensor([base.tokenizer.encode("round trip")])
    states = base.hidden_states(ids, None, [1, -1])
    with torch.no_grad():
        return base.logits(carry_on(states, states[-1]))


def test_save_load_round_trip_is_exact(base: FrozenBase, carry_on: CarryOn, tmp_path: Path) -> None:
    """Every tensor, the config and the logits come back exactly."""
    info = save_carry_on(carry_on, tmp_path / "adapter", base_fingerprints=[base.fingerprint()])
    loaded = load_carry_on(
        info.path, base_fingerprints=[base.fingerprint()], expected_sha256=info.sha256
    )
    assert loaded.config == carry_on.config
    original = carry_on.state_dict()
    restored = loaded.state_dict()
    assert original.keys() == restored.keys()
    for name, value in original.items():
        assert torch.equal(value, restored[name]), name
    assert torch.equal(_logits(base, loaded), _logits(base, carry_on))
    assert not loaded.training
    assert info.num_parameters == carry_on.num_parameters()
    assert info.nbytes == sum(f.stat().st_size for f in info.path.iterdir())


def test_grouped_ladder_round_trip_is_exact(base: FrozenBase, tmp_path: Path) -> None:
    """A ladder with more taps than blocks loads back with the same grouping and logits."""
    config = tiny_config(taps=(-1, 0, 1, 2), n_blocks=2, tap_mode="ladder")
    carry_on = perturb(new_carry_on(base, config), seed=8)
    info = save_carry_on(carry_on, tmp_path / "adapter", base_fingerprints=[base.fingerprint()])
    loaded = load_carry_on(info.path, base_fingerprints=[base.fingerprint()])
    assert loaded.config == carry_on.config
    assert loaded.config.ladder_blocks == (0, 0, 1)
    ids = torch.tensor([base.tokenizer.encode("round trip of a grouped ladder")])
    states = base.hidden_states(ids, None, [base.resolve_tap(t) for t in config.taps])
    with torch.no_grad():
        assert torch.equal(loaded(states, states[0]), carry_on(states, states[0]))


def test_artifact_holds_safetensors_and_a_json_config_only(
    base: FrozenBase, carry_on: CarryOn, tmp_path: Path
) -> None:
    """The artifact is two files: weights (safetensors, never a pickle) and the config."""
    info = save_carry_on(
        carry_on, tmp_path / "adapter", base_fingerprints=[base.fingerprint()], metadata={"j": 1}
    )
    assert sorted(p.name for p in info.path.iterdir()) == [WEIGHTS_FILE, CONFIG_FILE]
    document = read_artifact_config(info.path)
    assert document["bases"] == [base.fingerprint().to_dict()]
    assert document["carry_on"]["tap_sizes"] == [32, 32]
    assert document["metadata"] == {"j": 1}


def test_float16_artifact_loads_close_to_the_original(
    base: FrozenBase, carry_on: CarryOn, tmp_path: Path
) -> None:
    """A half-precision artifact is half the size and loads back within fp16 rounding."""
    full = save_carry_on(carry_on, tmp_path / "f32", base_fingerprints=[base.fingerprint()])
    half = save_carry_on(
        carry_on, tmp_path / "f16", base_fingerprints=[base.fingerprint()], dtype="float16"
    )
    assert half.nbytes < 0.6 * full.nbytes
    loaded = load_carry_on(half.path)
    for name, value in carry_on.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=1e-3, atol=1e-3)


def test_loading_for_a_different_base_is_refused_with_a_clear_message(
    base: FrozenBase, other_base: FrozenBase, carry_on: CarryOn, tmp_path: Path
) -> None:
    """A carry-on trained on one base is refused on another, naming both and the difference."""
    info = save_carry_on(carry_on, tmp_path / "adapter", base_fingerprints=[base.fingerprint()])
    with pytest.raises(IncompatibleBaseModelError) as caught:
        load_carry_on(info.path, base_fingerprints=[other_base.fingerprint()])
    message = caught.value.message
    assert "trained on base 'tiny'" in message
    assert "loaded base is 'other'" in message
    assert "LM head weights" in message
    assert caught.value.code == "incompatible_base_model"


def test_loading_with_the_wrong_number_of_bases_is_refused(
    base: FrozenBase, carry_on: CarryOn, tmp_path: Path
) -> None:
    """A one-base carry-on given two bases is an ArtifactError."""
    info = save_carry_on(carry_on, tmp_path / "adapter", base_fingerprints=[base.fingerprint()])
    with pytest.raises(ArtifactError, match="reads 1 base"):
        load_carry_on(info.path, base_fingerprints=[base.fingerprint(), base.fingerprint()])


@pytest.mark.parametrize("name", [WEIGHTS_FILE, CONFIG_FILE])
def test_corrupted_artifact_is_refused_by_its_sha256(
    base: FrozenBase, carry_on: CarryOn, tmp_path: Path, name: str
) -> None:
    """Changing one byte of either file makes a load with expected_sha256 fail."""
    info = save_carry_on(carry_on, tmp_path / "adapter", base_fingerprints=[base.fingerprint()])
    file = info.path / name
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x01
    file.write_bytes(bytes(data))
    assert artifact_sha256(info.path) != info.sha256
    with pytest.raises(ArtifactError, match="does not match its recorded sha256"):
        load_carry_on(info.path, expected_sha256=info.sha256)


def test_unreadable_weights_are_an_artifact_error(
    base: FrozenBase, carry_on: CarryOn, tmp_path: Path
) -> None:
    """A truncated weights file is reported as an ArtifactError, even without a sha256."""
    info = save_carry_on(carry_on, tmp_path / "adapter", base_fingerprints=[base.fingerprint()])
    weights = info.path / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="unreadable"):
        load_carry_on(info.path)


def test_weights_that_do_not_match_the_config_are_refused(
    base: FrozenBase, carry_on: CarryOn, tmp_path: Path
) -> None:
    """An artifact whose config describes another shape than its weights is refused."""
    info = save_carry_on(carry_on, tmp_path / "adapter", base_fingerprints=[base.fingerprint()])
    document = json.loads((info.path / CONFIG_FILE).read_text())
    document["carry_on"]["n_blocks"] = 3
    (info.path / CONFIG_FILE).write_text(json.dumps(document))
    with pytest.raises(ArtifactError, match="do not match its config"):
        load_carry_on(info.path)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        pytest.param(None, "has no carry_on_config.json", id="missing"),
        pytest.param("{not json", "not valid JSON", id="bad-json"),
        pytest.param('{"format_version": 99}', "unsupported format_version", id="newer"),
    ],
)
def test_a_missing_or_unknown_config_is_an_artifact_error(
    base: FrozenBase, carry_on: CarryOn, tmp_path: Path, content: str | None, match: str
) -> None:
    """A missing, malformed or newer-format config file is refused with an ArtifactError."""
    info = save_carry_on(carry_on, tmp_path / "adapter", base_fingerprints=[base.fingerprint()])
    config_file = info.path / CONFIG_FILE
    if content is None:
        config_file.unlink()
    else:
        config_file.write_text(content)
    with pytest.raises(ArtifactError, match=match):
        load_carry_on(info.path)


def test_saving_over_an_artifact_replaces_it_and_leaves_no_temporary_folders(
    base: FrozenBase, carry_on: CarryOn, tmp_path: Path
) -> None:
    """A second save to the same path swaps the artifact in atomically and cleans up."""
    first = save_carry_on(carry_on, tmp_path / "adapter", base_fingerprints=[base.fingerprint()])
    retrained = perturb(carry_on, seed=8)
    second = save_carry_on(retrained, tmp_path / "adapter", base_fingerprints=[base.fingerprint()])
    assert second.sha256 != first.sha256
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    loaded = load_carry_on(second.path, expected_sha256=second.sha256)
    assert torch.equal(loaded.up.weight, retrained.up.weight)


def test_unknown_save_dtype_is_refused(base: FrozenBase, carry_on: CarryOn, tmp_path: Path) -> None:
    """Only float32, float16 and bfloat16 artifacts are written."""
    with pytest.raises(ValueError, match="dtype"):
        save_carry_on(carry_on, tmp_path / "a", base_fingerprints=[], dtype="int4")
