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
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from bench.common import child_main, load_problems
from bench.lora import LORA_LEARNING_RATE, artifact_nbytes, lora_model, train_lora
from customization.base_model import BaseFingerprint, FrozenBase
from customization.carry_on import CarryOn
from customization.config import CarryOnConfig, FeatureConfig, StorageDtype, TrainingConfig
from customization.datasets import dataset_sha256, load_dataset
from customization.features import FeatureSet, extract_features, feature_cache_key
from customization.tokenizer import ChatTokenizer, TokenizedExample, tokenize_examples


def _tokenized(tokenizer: ChatTokenizer, data: bytes, max_length: int) -> list[TokenizedExample]:
    return tokenize_examples(load_dataset(data), tokenizer, max_length=max_length)


def _features(
    base: FrozenBase, data: bytes, spec: dict[str, Any], dtype: StorageDtype
) -> FeatureSet:
    """Validate, tokenize and extract (or find in the cache) the features of ``data``."""
    taps = tuple(spec.get("taps", CarryOnConfig().taps))  # the states every run reads
    config = FeatureConfig(taps=taps, max_length=spec["max_length"], storage_dtype=dtype)
    key = feature_cache_key(
        base_keys=[base.fingerprint().key], dataset_sha256=dataset_sha256(data), config=config
    )
    examples = _tokenized(base.tokenizer, data, spec["max_length"])
    return extract_features(base, examples, config, cache_dir=spec["cache_dir"], key=key)


def _problems(spec: dict[str, Any]) -> Any:
    return load_problems(spec["gsm8k"], spec["n_train"], spec["n_held_out"])


def _training_config(spec: dict[str, Any], **overrides: Any) -> TrainingConfig:
    return TrainingConfig(
        epochs=spec["epochs"], batch_size=spec["batch_size"], seed=spec["seed"], **overrides
    )


def run_extract(spec: dict[str, Any]) -> dict[str, Any]:
    from customization.base_model import load_base_model

    started = time.perf_counter()
    base = load_base_model(spec["base_dir"])
    base_load = time.perf_counter() - started
    problems = _problems(spec)
    started = time.perf_counter()
    train = _features(base, problems.train, spec, "float16")
    job = time.perf_counter() - started
    started = time.perf_counter()
    # Held-out states stay float32 so the carry-on's held-out loss is measured on the
    # same precision LoRA's is.
    held_out = _features(base, problems.held_out, spec, "float32")
    return {
        "kind": "extract",
        "data_source": problems.source,
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
    num_layers: int,
    fingerprint: BaseFingerprint,
) -> tuple[Any, list[dict[str, Any]]]:
    """Train on cached features, held-out loss after every epoch; the metrics it reported."""
    from customization.training import TrainingCallbacks, train_adapter

    history: list[dict[str, Any]] = []
    result = train_adapter(
        carry_on,
        train,
        head,
        training,
        num_layers=num_layers,
        base_fingerprints=[fingerprint],
        valid_data=held_out,
        callbacks=TrainingCallbacks(on_metrics=history.append),
    )
    return result, history


def run_carry_on(spec: dict[str, Any]) -> dict[str, Any]:
    """A carry-on's training node through the product's path (``load_training_node``, as
    the train task): the LM head read from the base's files, and the cached features."""
    from customization.checkpoint import save_carry_on
    from customization.training import FeatureLayout, evaluate, load_training_node

    started = time.perf_counter()
    fingerprint = BaseFingerprint.from_dict(spec["fingerprint"])
    num_layers = fingerprint.num_layers
    train = FeatureSet.open(spec["train_dir"]).load()
    config = CarryOnConfig(**spec["carry_on"])
    carry_on, head = load_training_node(spec["base_dir"], config, seed=spec["seed"])
    setup = time.perf_counter() - started
    held_out = FeatureSet.open(spec["held_out_dir"]).load()
    training = _training_config(spec)
    layout = FeatureLayout.for_config(held_out, carry_on.config, num_layers)
    base_loss = evaluate(None, held_out, layout, head, batch_size=training.batch_size)["loss"]
    result, history = train_with_history(
        carry_on, train, held_out, head, training, num_layers=num_layers, fingerprint=fingerprint
    )
    started = time.perf_counter()
    assert isinstance(result.carry_on, CarryOn)
    info = save_carry_on(result.carry_on, Path(spec["out_dir"]), base_fingerprints=[fingerprint])
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
    from customization.checkpoint import save_carry_on
    from customization.training import build_carry_on, train_adapter

    started = time.perf_counter()
    base = load_base_model(spec["base_dir"])
    base_load = time.perf_counter() - started
    problems = _problems(spec)
    started = time.perf_counter()
    feature_set = _features(base, problems.train, spec, "float16")
    lookup = time.perf_counter() - started
    config = CarryOnConfig(**spec["carry_on"])
    carry_on = build_carry_on(
        config,
        tap_sizes=[base.hidden_size] * len(config.taps),
        hidden_size=base.hidden_size,
        seed=spec["seed"],
    )
    train_adapter(
        carry_on,
        feature_set.load(),
        base.head_weight,
        _training_config(spec),
        num_layers=base.num_layers,
        base_fingerprints=[base.fingerprint()],
    )
    save_carry_on(carry_on, Path(spec["out_dir"]), base_fingerprints=[base.fingerprint()])
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
    problems = _problems(spec)
    train = _tokenized(tokenizer, problems.train, spec["max_length"])
    held_out = _tokenized(tokenizer, problems.held_out, spec["max_length"])
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
    from customization.checkpoint import save_adapter
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
        tail,
        train,
        held_out,
        head,
        training,
        num_layers=fingerprint.num_layers,
        fingerprint=fingerprint,
    )
    started = time.perf_counter()
    info = save_adapter(result.carry_on, Path(spec["out_dir"]), base_fingerprints=[fingerprint])
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
