"""Durable artifacts: what is renamed into place is flushed first, and a checkpoint damaged
on disk is skipped on resume (the one before it is used) instead of failing the job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from customization.base_model import FrozenBase
from customization.checkpoint import checkpoint_path, latest_checkpoint, save_carry_on
from customization.durable import replace_durably
from customization.errors import TrainingCancelled
from customization.features import FeatureData
from customization.training import TrainingCallbacks
from tests.helpers.carry_on_kit import RESUMABLE, new_carry_on, tiny_config, train_on_base


def _train(
    base: FrozenBase, data: FeatureData, folder: Path, callbacks: TrainingCallbacks | None = None
) -> Any:
    return train_on_base(
        base,
        new_carry_on(base, tiny_config(), seed=2),
        data,
        RESUMABLE,
        checkpoint_dir=folder,
        callbacks=callbacks,
    )


def _stop_after(steps: int) -> TrainingCallbacks:
    seen: list[int] = []

    def progress(p: dict[str, Any]) -> None:
        seen.append(p["step"])

    return TrainingCallbacks(on_progress=progress, should_cancel=lambda: len(seen) >= steps)


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 + 3] ^= 0xFF  # in the tensor data: still a readable file
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damaged", ["trainer_state.safetensors", "carry_on.safetensors"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(
    base: FrozenBase, toy_features: tuple[FeatureData, FeatureData], tmp_path: Path, damaged: str
) -> None:
    """Bytes changed in the newest checkpoint: resume falls back to the previous one and
    ends with exactly the weights of an uninterrupted run."""
    train, _ = toy_features
    reference = _train(base, train, tmp_path / "reference")
    folder = tmp_path / "checkpoints"
    with pytest.raises(TrainingCancelled):
        _train(base, train, folder, _stop_after(5))
    assert latest_checkpoint(folder) == checkpoint_path(folder, 4)
    _flip_a_byte(checkpoint_path(folder, 4) / damaged)

    assert latest_checkpoint(folder) == checkpoint_path(folder, 2)
    assert not checkpoint_path(folder, 4).exists()  # removed, never read again
    resumed = _train(base, train, folder)
    assert resumed.steps == reference.steps
    for (name, mine), (_, theirs) in zip(
        resumed.carry_on.state_dict().items(), reference.carry_on.state_dict().items(), strict=True
    ):
        assert mine.equal(theirs), name


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name the fds")
def test_a_replaced_artifact_is_flushed_before_and_its_folder_after_the_rename(
    base: FrozenBase, tmp_path: Path, fsynced: list[Path]
) -> None:
    """The files are on disk before the new name points at them, and the name itself is
    on disk before the write returns."""
    target = tmp_path / "adapter"
    save_carry_on(
        new_carry_on(base, tiny_config(), seed=0), target, base_fingerprints=[base.fingerprint()]
    )
    names = [path.name for path in fsynced]
    assert "carry_on.safetensors" in names
    assert "carry_on_config.json" in names
    assert fsynced[-1] == tmp_path  # the parent, after the rename

    fsynced.clear()
    staging = tmp_path / ".state.tmp"
    staging.write_bytes(b"state")
    replace_durably(staging, tmp_path / "state")
    assert fsynced == [staging, tmp_path]
