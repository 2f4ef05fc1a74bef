"""Presets a user understands: one name for an adapter kind, its shape and its schedule.

    fast      the ladder carry-on: cheapest to train, reads 8 cached states
    balanced  a tail over the base's top 12 layers (LoRA on every linear)
    best      a tail over every layer: LoRA on all linear layers, trained from the embeddings

Picked by ``bench/presets_bench.py`` at 512 training / 128 held-out GSM8K problems, 3 epochs,
against PEFT LoRA all-linear at its best learning rate so far (2e-3, held-out 0.744; 1e-3
gave 0.745; bench/results/presets.md): ``balanced`` is the cheapest run within 10 % of
tuned LoRA's loss among those timed side by side (depth 12: 1.076x, its first job 0.58x
LoRA's time to its best epoch, training-node peak RSS 0.49x; depth 16 was 1.035x at 0.75x,
depth 8 1.151x), ``best`` the closest (every layer: 1.000x). A preset only fills defaults:
explicit options given with it win.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from customization.config import TAIL_LEARNING_RATE, TrainingConfig

AdapterKind = Literal["carry_on", "tail"]
ADAPTER_KINDS: tuple[AdapterKind, ...] = ("carry_on", "tail")
# A tail depth larger than any base means "every layer" (the web layer clamps it to L).
EVERY_LAYER = 1024


@dataclass(frozen=True)
class Preset:
    name: str
    kind: AdapterKind
    summary: str
    # Options of the kind's config (CarryOnConfig or TailConfig) that differ from its defaults.
    options: dict[str, Any] = field(default_factory=dict)
    learning_rate: float = TrainingConfig().learning_rate
    epochs: int = TrainingConfig().epochs

    def tail_depth(self, num_layers: int) -> int | None:
        """The tail's depth on a base of ``num_layers`` layers; None for a carry-on."""
        if self.kind != "tail":
            return None
        return min(int(self.options.get("depth", 8)), num_layers)


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="fast",
            kind="carry_on",
            summary=(
                "carry-on: a 2-block ladder over 8 cached states; the cheapest job "
                "(held-out loss 1.27x tuned LoRA's in the presets benchmark)"
            ),
        ),
        Preset(
            name="balanced",
            kind="tail",
            summary=(
                "tail: LoRA on the base's top 12 layers from one cached state "
                "(held-out loss 1.08x tuned LoRA's, under half of LoRA's work per epoch)"
            ),
            options={"depth": 12},
            learning_rate=TAIL_LEARNING_RATE,
        ),
        Preset(
            name="best",
            kind="tail",
            summary=(
                "tail over every layer: standard LoRA on all linear layers, trained from "
                "the cached embeddings; tuned LoRA's quality (1.00x), the slowest job"
            ),
            options={"depth": EVERY_LAYER},
            learning_rate=TAIL_LEARNING_RATE,
        ),
    )
}
DEFAULT_PRESET = "fast"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def base_learning_rate(kind: AdapterKind, preset: str = "") -> float:
    """The peak learning rate at ``learning_rate_multiplier = 1`` for a job."""
    if preset:
        return get_preset(preset).learning_rate
    return TAIL_LEARNING_RATE if kind == "tail" else TrainingConfig().learning_rate
