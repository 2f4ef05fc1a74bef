"""Presets a user understands: one name for an adapter kind, its shape and its schedule.

    fast      the ladder carry-on: cheapest to train, reads 8 cached states
    balanced  a tail over the base's top 8 layers (LoRA on every linear)
    best      a tail over every layer: LoRA on all linear layers, trained from the embeddings

The figures quoted with each preset come from the quality study at 256 training / 128
held-out GSM8K problems on the bundled SmolLM2-135M (bench/results/sweep.md); the preset
benchmark of the tail issue (bench/results/presets.md, when it has run) replaces them.
A preset only fills defaults: explicit options given with it win.
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
                "(held-out loss 1.047 where LoRA on all layers reaches 0.926)"
            ),
        ),
        Preset(
            name="balanced",
            kind="tail",
            summary=(
                "tail: LoRA on the base's top 8 layers from one cached state "
                "(held-out loss 0.961, about 2.5x the carry-on's training time)"
            ),
            options={"depth": 8},
            learning_rate=TAIL_LEARNING_RATE,
        ),
        Preset(
            name="best",
            kind="tail",
            summary=(
                "tail over every layer: standard LoRA on all linear layers, trained from "
                "the cached embeddings; the best quality, the slowest job"
            ),
            options={"depth": EVERY_LAYER},
            learning_rate=1e-3,
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
