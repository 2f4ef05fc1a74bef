"""The customization pipeline, one step function per stage: plan the splits, extract,
train, save.

Every caller runs these same steps: the Celery tasks (extraction and training on
different queues, one step per task), the CLI and the headless demo (``train_pipeline``,
all steps in one process) and the benchmarks. A step takes ``StepHooks`` for progress,
heartbeats and cancellation and returns a typed outcome; it never reads settings.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from customization.base_model import BaseFingerprint, FrozenBase
from customization.checkpoint import ArtifactInfo, save_adapter
from customization.config import (
    CarryOnConfig,
    FeatureConfig,
    StorageDtype,
    TailConfig,
    TrainingConfig,
)
from customization.datasets import (
    Example,
    dataset_sha256,
    load_dataset,
    split_digest,
    split_examples,
)
from customization.features import (
    FeatureData,
    FeatureSet,
    ProgressFn,
    extract_features,
    feature_cache_key,
)
from customization.tokenizer import TokenizedExample, tokenize_examples
from customization.training import (
    Trainable,
    TrainingCallbacks,
    TrainingResult,
    build_adapter,
    train_adapter,
)


@dataclass(frozen=True)
class StepHooks:
    """What a caller hears while a step runs, and how it stops one (all optional).

    ``progress(done, total)`` reports examples (extraction) or optimizer steps (training)
    and doubles as a heartbeat; ``should_cancel`` is polled between batches and a True
    ends the step with ``TrainingCancelled``. The training-only hooks get the trainer's
    figures: every step, every epoch's metrics, every checkpoint written.
    """

    progress: Callable[[int, int], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    on_step: Callable[[dict[str, Any]], None] | None = None
    on_metrics: Callable[[dict[str, Any]], None] | None = None
    on_checkpoint: Callable[[int, ArtifactInfo, dict[str, Any]], None] | None = None


# -- plan the splits --------------------------------------------------------------------------


@dataclass(frozen=True)
class Splits:
    """Training and held-out examples, each with the digest that keys its cached features."""

    train: list[Example]
    valid: list[Example]
    train_digest: str
    valid_digest: str


def plan_splits(
    data: bytes, *, valid_fraction: float, seed: int, max_valid: int | None = None
) -> Splits:
    """Validate ``data`` and split it into training and held-out examples (seeded)."""
    examples = load_dataset(data)
    train, valid = split_examples(
        examples, valid_fraction=valid_fraction, seed=seed, max_valid=max_valid
    )
    file_sha256 = dataset_sha256(data)
    digests = [
        split_digest(
            file_sha256, part=part, valid_fraction=valid_fraction, max_valid=max_valid, seed=seed
        )
        for part in ("train", "valid")
    ]
    return Splits(train, valid, digests[0], digests[1])


def feature_config_for(
    config: CarryOnConfig | TailConfig, *, max_length: int, storage_dtype: StorageDtype
) -> FeatureConfig:
    """The states an adapter reads: a carry-on its taps and the final state, a tail the
    one state below its first layer (``config`` resolved for the base)."""
    if isinstance(config, TailConfig):
        return FeatureConfig(
            taps=(config.first_layer,),
            max_length=max_length,
            storage_dtype=storage_dtype,
            include_final=False,
        )
    return FeatureConfig(taps=config.taps, max_length=max_length, storage_dtype=storage_dtype)


# -- extract ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeaturePart:
    """One feature set to extract: its cache key and its tokenized examples."""

    key: str
    examples: Sequence[TokenizedExample]


@dataclass(frozen=True)
class Extracted:
    """The feature sets of an extraction step, in the order of its parts."""

    feature_sets: list[FeatureSet]
    seconds: float

    @property
    def extracted(self) -> bool:
        """Whether the base ran at all (False: every part was a cache hit)."""
        return any(feature_set.extracted for feature_set in self.feature_sets)


def feature_part(
    base: FrozenBase,
    examples: Sequence[Example],
    config: FeatureConfig,
    *,
    digest: str,
) -> FeaturePart:
    """Tokenize ``examples`` for ``base`` and key them by content (``feature_cache_key``)."""
    key = feature_cache_key(
        base_keys=[base.fingerprint().key], dataset_sha256=digest, config=config
    )
    return FeaturePart(
        key, tokenize_examples(examples, base.tokenizer, max_length=config.max_length)
    )


def extract(
    base: FrozenBase,
    parts: Sequence[FeaturePart],
    config: FeatureConfig,
    *,
    cache_dir: str | Path,
    hooks: StepHooks | None = None,
    on_ready: Callable[[int, FeatureSet], None] | None = None,
) -> Extracted:
    """Run the frozen base over each part once (a cached part is looked up, not rerun).

    Progress counts examples across all parts; ``on_ready(index, feature_set)`` hears of
    each part as soon as it is on disk, so a later cancellation keeps the work done.
    """
    hooks = hooks or StepHooks()
    total = sum(len(part.examples) for part in parts)
    started = time.perf_counter()
    feature_sets = []
    done = 0
    for index, part in enumerate(parts):
        progress = _offset(hooks.progress, done, total) if hooks.progress else None
        feature_set = extract_features(
            base,
            part.examples,
            config,
            cache_dir=cache_dir,
            key=part.key,
            progress=progress,
            cancel=hooks.should_cancel,
        )
        if on_ready is not None:
            on_ready(index, feature_set)
        feature_sets.append(feature_set)
        done += len(part.examples)
    return Extracted(feature_sets, time.perf_counter() - started)


def _offset(report: Callable[[int, int], None], offset: int, total: int) -> ProgressFn:
    """One part's progress (n of its own examples) as progress over every part."""

    def progress(n: int, _part_total: int) -> None:
        report(offset + n, total)

    return progress


# -- train ------------------------------------------------------------------------------------


def train(
    adapter: Trainable,
    head_weight: torch.Tensor,
    train_data: FeatureData,
    config: TrainingConfig,
    *,
    fingerprint: BaseFingerprint,
    valid_data: FeatureData | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    initial_weights: Mapping[str, torch.Tensor] | None = None,
    hooks: StepHooks | None = None,
) -> TrainingResult:
    """Train a fresh adapter (``load_training_node`` or ``build_adapter``) on cached features.

    Keep-best on the held-out loss; with ``checkpoint_dir`` it checkpoints and, with
    ``resume``, continues from the newest intact checkpoint there.
    """
    hooks = hooks or StepHooks()

    def on_progress(p: dict[str, Any]) -> None:
        if hooks.on_step is not None:
            hooks.on_step(p)
        if hooks.progress is not None:
            hooks.progress(p["step"], p["total_steps"])

    return train_adapter(
        adapter,
        train_data,
        head_weight,
        config,
        num_layers=fingerprint.num_layers,
        base_fingerprints=[fingerprint],
        valid_data=valid_data,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        callbacks=TrainingCallbacks(
            on_progress=on_progress,
            on_metrics=hooks.on_metrics,
            on_checkpoint=hooks.on_checkpoint,
            should_cancel=hooks.should_cancel,
        ),
        initial_weights=initial_weights,
    )


# -- save -------------------------------------------------------------------------------------


def save(
    adapter: Trainable,
    out: str | Path,
    *,
    fingerprint: BaseFingerprint,
    metadata: dict[str, Any] | None = None,
) -> ArtifactInfo:
    """Write the trained adapter as a servable artifact, atomically."""
    return save_adapter(adapter, out, base_fingerprints=[fingerprint], metadata=metadata)


# -- all steps in one process (CLI, demo) -----------------------------------------------------


def progress_bar(total: int, desc: str, unit: str) -> Any:
    """A tqdm bar on stderr (hidden when stderr is not a terminal)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, disable=None)


def _bar_hook(bar: Any) -> Callable[[int, int], None]:
    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return update


def train_pipeline(
    base: FrozenBase,
    data: bytes,
    *,
    carry_on_config: CarryOnConfig | TailConfig,
    training_config: TrainingConfig,
    max_length: int,
    storage_dtype: StorageDtype,
    cache_dir: Path,
    out: Path,
    valid_fraction: float,
    quiet: bool = False,
) -> dict[str, Any]:
    """Plan -> extract (cached) -> train -> save with a base loaded here. Returns a summary."""
    seed = training_config.seed
    splits = plan_splits(data, valid_fraction=valid_fraction, seed=seed)
    if isinstance(carry_on_config, TailConfig):
        carry_on_config = carry_on_config.resolved(num_layers=base.num_layers)
    config = feature_config_for(carry_on_config, max_length=max_length, storage_dtype=storage_dtype)
    subsets = [(splits.train, splits.train_digest), (splits.valid, splits.valid_digest)]
    parts = [feature_part(base, ex, config, digest=d) for ex, d in subsets if ex]
    bar = None if quiet else progress_bar(0, "extract", "ex")
    extracted = extract(
        base,
        parts,
        config,
        cache_dir=cache_dir,
        hooks=StepHooks(progress=None if bar is None else _bar_hook(bar)),
    )
    if bar is not None:
        bar.close()
    train_data = extracted.feature_sets[0].load()
    valid_data = extracted.feature_sets[1].load() if len(parts) > 1 else None
    fingerprint = base.fingerprint()
    adapter = build_adapter(base, carry_on_config, seed=seed)
    bar = None if quiet else progress_bar(0, "train", "step")

    def on_step(p: dict[str, Any]) -> None:
        if bar is not None:
            bar.set_postfix(loss=f"{p['train_loss']:.3f}")

    def on_metrics(m: dict[str, Any]) -> None:
        if not quiet:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}
            print(json.dumps(shown), file=sys.stderr)

    started = time.perf_counter()
    result = train(
        adapter,
        base.head_weight,
        train_data,
        training_config,
        fingerprint=fingerprint,
        valid_data=valid_data,
        checkpoint_dir=out / "checkpoints",
        hooks=StepHooks(
            progress=None if bar is None else _bar_hook(bar),
            on_step=on_step,
            on_metrics=on_metrics,
        ),
    )
    if bar is not None:
        bar.close()
    info = save(result.carry_on, out / "adapter", fingerprint=fingerprint)
    return {
        "adapter": str(info.path),
        "sha256": info.sha256,
        "bytes": info.nbytes,
        "parameters": info.num_parameters,
        "extraction_seconds": extracted.seconds,
        "extracted": extracted.extracted,
        "training_seconds": time.perf_counter() - started,
        "best_valid_loss": result.best_valid_loss,
        "history": result.history,
        "valid_examples": splits.valid,
    }
