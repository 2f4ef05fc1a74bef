"""The whole customization in one call: validate, tokenize, extract, train, save.

Used by the CLI, the headless demo and the benchmarks; the web platform runs the same
steps as separate Celery tasks (extraction and training on different queues).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from customization.config import StorageDtype


def _bar_callback(bar: Any) -> Callable[[int, int], None] | None:
    if bar is None:
        return None

    def update(done: int, total: int) -> None:
        bar.update(done - bar.n)

    return update


def progress_bar(total: int, desc: str, unit: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, disable=None)


def train_pipeline(
    base: Any,
    data: bytes,
    *,
    carry_on_config: Any,
    training_config: Any,
    max_length: int,
    storage_dtype: StorageDtype,
    cache_dir: Path,
    out: Path,
    valid_fraction: float,
    quiet: bool = False,
) -> dict[str, Any]:
    """Validate -> tokenize -> extract (cached) -> train -> save. Returns a summary."""
    from customization.checkpoint import save_adapter
    from customization.config import FeatureConfig, TailConfig
    from customization.datasets import dataset_sha256, load_dataset, split_examples
    from customization.features import extract_features, feature_cache_key
    from customization.tokenizer import tokenize_examples
    from customization.training import TrainingCallbacks, build_adapter, train_adapter

    examples = load_dataset(data)
    train_examples, valid_examples = split_examples(
        examples, valid_fraction=valid_fraction, seed=training_config.seed
    )
    is_tail = isinstance(carry_on_config, TailConfig)
    if is_tail:
        carry_on_config = carry_on_config.resolved(num_layers=base.num_layers)
    feature_config = FeatureConfig(
        taps=(carry_on_config.first_layer,) if is_tail else carry_on_config.taps,
        max_length=max_length,
        storage_dtype=storage_dtype,
        include_final=not is_tail,
    )
    sets = {}
    started = time.perf_counter()
    for name, subset in (("train", train_examples), ("valid", valid_examples)):
        if not subset:
            continue
        tokenized = tokenize_examples(subset, base.tokenizer, max_length=max_length)
        digest = dataset_sha256(data) + f":{name}:{training_config.seed}:{valid_fraction}"
        key = feature_cache_key(
            base_keys=[base.fingerprint().key], dataset_sha256=digest, config=feature_config
        )
        bar = None if quiet else progress_bar(len(tokenized), f"extract {name}", "ex")
        sets[name] = extract_features(
            base,
            tokenized,
            feature_config,
            cache_dir=cache_dir,
            key=key,
            progress=_bar_callback(bar),
        )
        if bar is not None:
            bar.close()
    extraction_seconds = time.perf_counter() - started
    carry_on = build_adapter(base, carry_on_config, seed=training_config.seed)
    train_data = sets["train"].load()
    valid_data = sets["valid"].load() if "valid" in sets else None
    bar = None if quiet else progress_bar(0, "train", "step")
    steps_seen = {"n": 0}

    def on_progress(p: dict[str, Any]) -> None:
        if bar is not None:
            bar.total = p["total_steps"]
            bar.update(p["step"] - steps_seen["n"])
            bar.set_postfix(loss=f"{p['train_loss']:.3f}")
            steps_seen["n"] = p["step"]

    def on_metrics(m: dict[str, Any]) -> None:
        if not quiet:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}
            print(json.dumps(shown), file=sys.stderr)

    started = time.perf_counter()
    result = train_adapter(
        carry_on,
        train_data,
        base.head_weight,
        training_config,
        num_layers=base.num_layers,
        base_fingerprints=[base.fingerprint()],
        valid_data=valid_data,
        checkpoint_dir=out / "checkpoints",
        callbacks=TrainingCallbacks(on_progress=on_progress, on_metrics=on_metrics),
    )
    if bar is not None:
        bar.close()
    info = save_adapter(result.carry_on, out / "adapter", base_fingerprints=[base.fingerprint()])
    return {
        "adapter": str(info.path),
        "sha256": info.sha256,
        "bytes": info.nbytes,
        "parameters": info.num_parameters,
        "extraction_seconds": extraction_seconds,
        "extracted": any(s.extracted for s in sets.values()),
        "training_seconds": time.perf_counter() - started,
        "best_valid_loss": result.best_valid_loss,
        "history": result.history,
        "valid_examples": valid_examples,
    }
