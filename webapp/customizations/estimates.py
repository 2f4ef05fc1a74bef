"""A rough time estimate for a fine-tuning job, shown on the new-job page (labelled so).

The model follows where the time goes (docs/architecture.md, "Where the cost is"):

- extraction runs the frozen base once over every token: cost ∝ tokens × layers × D²;
- each training epoch is dominated by the frozen LM head at the loss positions, forward
  and the gradient to its input (2 × D × V multiply-adds per loss token), plus the carry-on
  body (about 12 × d² per block per token, times 3 for forward and backward) and its
  projections in and out (2 × D × d, times 3);
- a tail (docs/architecture.md, "The tail") instead re-runs the base's top ``depth`` layers
  over every token, forward and the gradient to their input (LoRA-class: the frozen weights
  need no weight gradient and the low-rank factors are small), so 2 × depth × one full-width
  layer's multiply-adds per token, plus the same LM head at the loss positions;
- a fixed overhead: queueing, loading the base, writing the artifact.

The rates were measured on this project's reference machine (2 CPU cores, the torch CPU
build, 2 torch threads) with SmolLM2-135M-Instruct on 40 demo arithmetic problems (5,694
tokens, 3,051 of them answer tokens): extraction took 73 s of CPU time and one training
epoch (default carry-on, batch size 8) 16 s, so about half that in wall time on an idle
machine (``customization.pipeline.train_pipeline`` timed phase by phase). A GPU, or a busy
machine, changes the answer by a constant factor: that is why the page says "estimate".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from customization.presets import PRESETS
from webapp.customizations.models import BaseModel, File
from webapp.customizations.options import (
    AUTO_HYPERPARAMETERS,
    CARRY_ON,
    TAIL,
    base_linear_shapes,
    base_num_layers,
)
from webapp.customizations.services.planning import VALID_FRACTION

# From the measurement above (wall seconds = CPU seconds / 2 threads):
# extraction 5,694 tokens × 30 layers × 576² / 36.5 s ≈ 1.6e9 "layer units" per second;
EXTRACT_UNITS_PER_SECOND = 1.6e9
# training 0.9 × 3,051 loss tokens × (2 × 576 × 49,152 + 3 × (12 × 2 × 128² + 2 × 576 × 128))
# / 8 s ≈ 2.0e10 units per second.
TRAIN_UNITS_PER_SECOND = 2.0e10
OVERHEAD_SECONDS = 15.0
# Uploads validated before loss tokens were counted: the share of tokens that are answers.
DEFAULT_LOSS_SHARE = 0.5
# Without a validation file the pipeline holds out VALID_FRACTION; this share trains.
TRAIN_SHARE = 1 - VALID_FRACTION


@dataclass(frozen=True)
class JobEstimate:
    seconds: float
    extract_seconds: float
    train_seconds: float

    @property
    def text(self) -> str:
        return f"about {duration_text(self.seconds)}"


def job_estimate(
    *,
    n_tokens: int,
    n_loss_tokens: int | None,
    fingerprint: dict[str, Any],
    epochs: int,
    d_model: int,
    n_blocks: int,
) -> JobEstimate:
    """Seconds for extraction plus ``epochs`` epochs of training, plus a fixed overhead."""
    hidden = int(fingerprint.get("hidden_size") or 576)
    layers = int(fingerprint.get("num_layers") or 30)
    vocab = int(fingerprint.get("vocab_size") or 49152)
    extract = n_tokens * layers * hidden**2 / EXTRACT_UNITS_PER_SECOND
    loss_tokens = n_loss_tokens if n_loss_tokens is not None else n_tokens * DEFAULT_LOSS_SHARE
    per_token = 2 * hidden * vocab + 3 * (12 * n_blocks * d_model**2 + 2 * hidden * d_model)
    train = epochs * TRAIN_SHARE * loss_tokens * per_token / TRAIN_UNITS_PER_SECOND
    return JobEstimate(
        seconds=OVERHEAD_SECONDS + extract + train, extract_seconds=extract, train_seconds=train
    )


def tail_job_estimate(
    *,
    n_tokens: int,
    n_loss_tokens: int | None,
    fingerprint: dict[str, Any],
    epochs: int,
    depth: int,
    layer_units: int,
) -> JobEstimate:
    """A tail's: the carry-on's extraction, then ``depth`` layers of ``layer_units``
    multiply-adds per token (the sum of a layer's linear shapes), forward and backward."""
    hidden = int(fingerprint.get("hidden_size") or 576)
    layers = int(fingerprint.get("num_layers") or 30)
    vocab = int(fingerprint.get("vocab_size") or 49152)
    extract = n_tokens * layers * hidden**2 / EXTRACT_UNITS_PER_SECOND
    loss_tokens = n_loss_tokens if n_loss_tokens is not None else n_tokens * DEFAULT_LOSS_SHARE
    # Attention needs every position, so the layers run over all tokens; the head does not.
    units = loss_tokens * 2 * hidden * vocab + n_tokens * 2 * depth * layer_units
    train = epochs * TRAIN_SHARE * units / TRAIN_UNITS_PER_SECOND
    return JobEstimate(
        seconds=OVERHEAD_SECONDS + extract + train, extract_seconds=extract, train_seconds=train
    )


def duration_text(seconds: float) -> str:
    """``40 seconds``, ``3 minutes``, ``1 h 20 min``: rounded as an estimate should be."""
    if seconds < 60:
        return f"{max(10, round(seconds / 10) * 10)} seconds"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def file_job_estimate(
    *,
    file: File,
    base: BaseModel | None,
    epochs: int | None = None,
    d_model: int | None = None,
    n_blocks: int | None = None,
    kind: str = "carry_on",
    depth: int | None = None,
) -> JobEstimate | None:
    """The estimate for a job on ``file`` (None when its tokens were not counted)."""
    if base is None or not file.n_tokens:
        return None
    loss_tokens = file.report.get("n_loss_tokens")
    if kind == "tail":
        layers = base_num_layers(base)
        depth = depth or int(TAIL.defaults["depth"])
        return tail_job_estimate(
            n_tokens=file.n_tokens,
            n_loss_tokens=loss_tokens if isinstance(loss_tokens, int) else None,
            fingerprint=base.fingerprint or {},
            epochs=epochs or int(AUTO_HYPERPARAMETERS["n_epochs"]),
            depth=min(depth, layers) if layers else depth,
            layer_units=sum(i * o for i, o in base_linear_shapes(base).values()),
        )
    return job_estimate(
        n_tokens=file.n_tokens,
        n_loss_tokens=loss_tokens if isinstance(loss_tokens, int) else None,
        fingerprint=base.fingerprint or {},
        epochs=epochs or int(AUTO_HYPERPARAMETERS["n_epochs"]),
        d_model=d_model or int(CARRY_ON.defaults["d_model"]),
        n_blocks=n_blocks or int(CARRY_ON.defaults["n_blocks"]),
    )


def preset_estimates(
    *, file: File | None, base: BaseModel | None, epochs: int | None = None
) -> dict[str, JobEstimate | None]:
    """Each preset's estimate for a job on ``file`` (None where it cannot be told)."""
    layers = base_num_layers(base) or 30
    return {
        name: file_job_estimate(
            file=file, base=base, epochs=epochs, kind=preset.kind, depth=preset.tail_depth(layers)
        )
        if file is not None
        else None
        for name, preset in PRESETS.items()
    }
