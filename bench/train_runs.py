"""One training-benchmark run per process: ``python -m bench.train_runs spec.json out.json``.

``train_bench`` starts each run here in a fresh process so that the peak RSS it reports is
that run's own. Kinds:

- ``extract``: the first job's extraction step (validate, tokenize, run the base once and
  cache the states) plus, untimed for the job, the held-out features in float32.
- ``carry_on``: a training node: the LM head and the cached features only, 3 epochs,
  held-out loss after each, save the artifact.
- ``cache_hit``: a second job on the same data, end to end: validate, tokenize, cache
  lookup (hit), train, save.
- ``tail``: a tail's training node, through the product's own code path
  (``load_training_node`` + ``train_adapter``, what the Celery task calls): the top k
  layers, the norm, the LM head and the one cached state it reads.
- ``lora``: PEFT LoRA through the whole base on the same examples (``learning_rate`` in
  the spec overrides the default, for the tuned baseline).
- ``exact_match``: greedy final-answer exact match on held-out problems for the base, a
  trained carry-on or a trained LoRA (``bench.exact_match``).

A spec may also set what a fine-tuning job resolves, so a run can repeat one job exactly
(every key optional; absent, the benchmark's own choice stays):

- ``data`` (a JSONL path) with ``valid_fraction``, ``max_valid`` and ``split_seed``: the
  training and held-out examples are that file split as a job splits it
  (``pipeline.plan_splits``), instead of the GSM8K (or generated) problems;
- ``storage_dtype`` and ``held_out_storage_dtype``: how the two splits' states are cached
  (float16 and float32 by default);
- ``learning_rate`` and ``early_stopping_patience`` for every kind (the carry-on's learning
  rate defaults to ``TrainingConfig``'s, LoRA's to ``LORA_LEARNING_RATE``).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import child_main, load_problems
from bench.lora import LORA_LEARNING_RATE, artifact_nbytes, lora_model, train_lora
from customization import pipeline
from customization.base_model import BaseFingerprint, FrozenBase
from customization.config import CarryOnConfig, FeatureConfig, StorageDtype, TrainingConfig
from customization.datasets import Example, dataset_sha256, load_dataset
from customization.features import FeatureSet
from customization.tokenizer import ChatTokenizer, tokenize_examples


def _features(
    base: FrozenBase,
    examples: Sequence[Example],
    digest: str,
    spec: dict[str, Any],
    dtype: StorageDtype,
) -> FeatureSet:
    """Tokenize and extract (or find in the cache) the features of ``examples``."""
    taps = tuple(spec.get("taps", CarryOnConfig().taps))  # the states every run reads
    config = FeatureConfig(taps=taps, max_length=spec["max_length"], storage_dtype=dtype)
    part = pipeline.feature_part(base, examples, config, digest=digest)
    return pipeline.extract(base, [part], config, cache_dir=spec["cache_dir"]).feature_sets[0]


def _problems(spec: dict[str, Any]) -> Any:
    return load_problems(spec["gsm8k"], spec["n_train"], spec["n_held_out"])


@dataclass(frozen=True)
class _Data:
    """What a run trains and evaluates on, read but not yet validated (a timed step)."""

    train: bytes
    held_out: bytes
    source: str
    split: dict[str, Any] | None = None  # plan_splits' settings: ``train`` is one file to split

    def part(self, name: str) -> tuple[list[Example], str]:
        """The validated examples of ``"train"`` or ``"held_out"`` and the digest keying them."""
        if self.split is not None:
            splits = pipeline.plan_splits(self.train, **self.split)
            if name == "train":
                return splits.train, splits.train_digest
            return splits.valid, splits.valid_digest
        data = self.train if name == "train" else self.held_out
        return load_dataset(data), dataset_sha256(data)


def _data(spec: dict[str, Any]) -> _Data:
    """The spec's ``data`` file, split as a job splits it, else the benchmark's problems."""
    if "data" in spec:
        split = {
            "valid_fraction": spec["valid_fraction"],
            "seed": spec["split_seed"],
            "max_valid": spec.get("max_valid"),
        }
        return _Data(Path(spec["data"]).read_bytes(), b"", spec["data"], split)
    problems = _problems(spec)
    return _Data(problems.train, problems.held_out, problems.source)


def _training_config(spec: dict[str, Any], **overrides: Any) -> TrainingConfig:
    """The spec's schedule; the learning rate and patience only where the spec sets them."""
    optional = {k: spec[k] for k in ("learning_rate", "early_stopping_patience") if k in spec}
    return TrainingConfig(
        epochs=spec["epochs"],
        batch_size=spec["batch_size"],
        seed=spec["seed"],
        **{**optional, **overrides},
    )


def run_extract(spec: dict[str, Any]) -> dict[str, Any]:
    from customization.base_model import load_base_model

    started = time.perf_counter()
    base = load_base_model(spec["base_dir"])
    base_load = time.perf_counter() - started
    data = _data(spec)
    started = time.perf_counter()
    train = _features(base, *data.part("train"), spec, spec.get("storage_dtype", "float16"))
    job = time.perf_counter() - started
    started = time.perf_counter()
    # Held-out states stay float32 so the carry-on's held-out loss is measured on the
    # same precision LoRA's is.
    held_out_dtype = spec.get("held_out_storage_dtype", "float32")
    held_out = _features(base, *data.part("held_out"), spec, held_out_dtype)
    return {
        "kind": "extract",
        "data_source": data.source,
        "base_load_seconds": base_load,
        "job_seconds": job,
        "extracted": train.extracted,
        "held_out_seconds": time.perf_counter() - started,
        "train_dir": str(train.path),
        "held_out_dir": str(held_out.path),
        "n_examples": train.n_examples,
        "n_tokens": train.n_tokens,
        "n_target_tokens": train.n_target_tokens,
        "feature_bytes": train.nbytes,
        "fingerprint": base.fingerprint().to_dict(),
    }


def train_with_history(
    carry_on: Any,
    train: Any,
    held_out: Any,
    head: Any,
    training: TrainingConfig,
    *,
    fingerprint: BaseFingerprint,
) -> tuple[Any, list[dict[str, Any]]]:
    """Train on cached features (the train step), held-out loss after every epoch; the
    metrics it reported."""
    history: list[dict[str, Any]] = []
    result = pipeline.train(
        carry_on,
        head,
        train,
        training,
        fingerprint=fingerprint,
        valid_data=held_out,
        hooks=pipeline.StepHooks(on_metrics=history.append),
    )
    return result, history


def run_carry_on(spec: dict[str, Any]) -> dict[str, Any]:
    """A carry-on's training node through the product's path (``load_training_node``, as
    the train task): the LM head read from the base's files, and the cached features."""
    from customization.training import FeatureLayout, evaluate, load_training_node

    started = time.perf_counter()
    fingerprint = BaseFingerprint.from_dict(spec["fingerprint"])
    num_layers = fingerprint.num_layers
    train = FeatureSet.open(spec["train_dir"]).load()
    config = CarryOnConfig.from_dict(spec["carry_on"])
    carry_on, head = load_training_node(spec["base_dir"], config, seed=spec["seed"])
    setup = time.perf_counter() - started
    held_out = FeatureSet.open(spec["held_out_dir"]).load()
    training = _training_config(spec)
    layout = FeatureLayout.for_config(held_out, carry_on.config, num_layers)
    base_loss = evaluate(None, held_out, layout, head, batch_size=training.batch_size)["loss"]
    result, history = train_with_history(
        carry_on, train, held_out, head, training, fingerprint=fingerprint
    )
    started = time.perf_counter()
    info = pipeline.save(result.carry_on, Path(spec["out_dir"]), fingerprint=fingerprint)
    return {
        "kind": "carry_on",
        "carry_on_config": carry_on.config.to_dict(),
        "learning_rate": training.learning_rate,
        "setup_seconds": setup,
        "save_seconds": time.perf_counter() - started,
        "base_held_out_loss": base_loss,
        "epochs": [_epoch(m) for m in history],
        "trainable_parameters": info.num_parameters,
        "artifact_bytes": info.nbytes,
    }


def _epoch(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "epoch": metrics["epoch"],
        "epoch_seconds": metrics["epoch_seconds"],
        "valid_loss": metrics.get("valid_loss"),
    }


def run_cache_hit(spec: dict[str, Any]) -> dict[str, Any]:
    from customization.base_model import load_base_model
    from customization.training import build_carry_on

    started = time.perf_counter()
    base = load_base_model(spec["base_dir"])
    base_load = time.perf_counter() - started
    data = _data(spec)
    started = time.perf_counter()
    feature_set = _features(base, *data.part("train"), spec, spec.get("storage_dtype", "float16"))
    lookup = time.perf_counter() - started
    config = CarryOnConfig.from_dict(spec["carry_on"])
    carry_on = build_carry_on(config, width=base.hidden_size, seed=spec["seed"])
    fingerprint = base.fingerprint()
    pipeline.train(
        carry_on,
        base.head_weight,
        feature_set.load(),
        _training_config(spec),
        fingerprint=fingerprint,
    )
    pipeline.save(carry_on, Path(spec["out_dir"]), fingerprint=fingerprint)
    return {
        "kind": "cache_hit",
        "cache_hit": not feature_set.extracted,
        "base_load_seconds": base_load,
        "validate_tokenize_lookup_seconds": lookup,
        "job_seconds": time.perf_counter() - started,
    }


def run_lora(spec: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    tokenizer = ChatTokenizer.from_dir(spec["base_dir"])
    data = _data(spec)
    train, held_out = (
        tokenize_examples(data.part(name)[0], tokenizer, max_length=spec["max_length"])
        for name in ("train", "held_out")
    )
    model = lora_model(Path(spec["base_dir"]), spec["lora"], seed=spec["seed"])
    setup = time.perf_counter() - started
    trainable, _ = model.get_nb_trainable_parameters()
    training = _training_config(spec, learning_rate=spec.get("learning_rate", LORA_LEARNING_RATE))
    history: list[dict[str, Any]] = []
    train_lora(model, train, held_out, tokenizer.pad_token_id, training, history.append)
    started = time.perf_counter()
    model.save_pretrained(spec["out_dir"])
    return {
        "kind": "lora",
        "targets": list(model.peft_config["default"].target_modules),
        "learning_rate": training.learning_rate,
        "setup_seconds": setup,
        "save_seconds": time.perf_counter() - started,
        "epochs": [_epoch(m) for m in history],
        "trainable_parameters": int(trainable),
        "artifact_bytes": artifact_nbytes(Path(spec["out_dir"])),
        "n_tokens": sum(len(e.input_ids) for e in train),
        "n_target_tokens": sum(e.n_targets for e in train),
    }


def run_tail(spec: dict[str, Any]) -> dict[str, Any]:
    from customization.config import TailConfig
    from customization.training import FeatureLayout, evaluate, load_training_node

    started = time.perf_counter()
    fingerprint = BaseFingerprint.from_dict(spec["fingerprint"])
    config = TailConfig(**spec["tail"]).resolved(num_layers=fingerprint.num_layers)
    state = [(0, config.first_layer)]
    train = FeatureSet.open(spec["train_dir"]).load(state)
    tail, head = load_training_node(spec["base_dir"], config, seed=spec["seed"])
    setup = time.perf_counter() - started
    held_out = FeatureSet.open(spec["held_out_dir"]).load(state)
    training = _training_config(spec, learning_rate=spec["learning_rate"])
    layout = FeatureLayout.for_model(held_out, tail, fingerprint.num_layers)
    init_loss = evaluate(tail, held_out, layout, head, batch_size=training.batch_size)["loss"]
    result, history = train_with_history(
        tail, train, held_out, head, training, fingerprint=fingerprint
    )
    started = time.perf_counter()
    info = pipeline.save(result.carry_on, Path(spec["out_dir"]), fingerprint=fingerprint)
    return {
        "kind": "tail",
        "tail_config": config.to_dict(),
        "learning_rate": training.learning_rate,
        "setup_seconds": setup,
        "save_seconds": time.perf_counter() - started,
        "init_held_out_loss": init_loss,
        "epochs": [_epoch(m) for m in history],
        "trainable_parameters": info.num_parameters,
        "artifact_bytes": info.nbytes,
    }


def run_exact_match(spec: dict[str, Any]) -> dict[str, Any]:
    from bench.exact_match import exact_match_run

    return exact_match_run(
        Path(spec["base_dir"]),
        _problems(spec).held_out,
        kind=spec["model_kind"],
        adapter=spec.get("adapter"),
        n=spec["exact_match_problems"],
        max_new_tokens=spec["max_new_tokens"],
    )


RUNS = {
    "extract": run_extract,
    "carry_on": run_carry_on,
    "cache_hit": run_cache_hit,
    "lora": run_lora,
    "tail": run_tail,
    "exact_match": run_exact_match,
}


if __name__ == "__main__":
    sys.exit(child_main(lambda spec: RUNS[spec["kind"]](spec)))
