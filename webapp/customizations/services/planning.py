"""The plan of a job: its data splits, adapter/feature/training configs, tokens, feature sets.

File validation (the first stage) resolves every "auto" option from the data and picks the
cached or pending feature sets the next stages read and write. Both it and extraction take
the examples' tokens from the upload's stored tokenization when it fits (``job_tokenized``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction

from webapp.core.exceptions import ApplicationError
from webapp.core.utils import data_path
from webapp.customizations.artifacts import feature_set_complete
from webapp.customizations.models import Adapter, FeatureSet, File, FineTuningJob
from webapp.customizations.options import AUTO_HYPERPARAMETERS
from webapp.customizations.selectors import base_tokenizer, file_read
from webapp.customizations.services.files import (
    StoredTokenization,
    feature_scope,
    file_tokenization,
)
from webapp.customizations.services.job_options import job_options
from webapp.customizations.services.jobs import enqueue_stage, job_event_create, job_transition

Status = FineTuningJob.Status
Stage = FineTuningJob.Stage
# Without a validation file, this share of the training file (at most this many) is held out.
VALID_FRACTION = 0.1
MAX_VALID_EXAMPLES = 64
SPLIT_SEED = 0  # fixed, so every job on one file shares the split and its cached features


@dataclass
class JobSplits:
    train: list[Any]  # customization.datasets.Example
    valid: list[Any]
    train_digest: str
    valid_digest: str


def job_splits(job: FineTuningJob) -> JobSplits:
    """The job's training and validation examples and the digests that key their features."""
    from customization.datasets import load_dataset, split_digest, split_examples
    from customization.errors import DatasetFormatError

    if job.training_file is None:
        raise ApplicationError("the training file was deleted", param="training_file")
    train_file = job.training_file
    try:
        examples = load_dataset(file_read(file=train_file))
    except DatasetFormatError as exc:
        exc.param = "training_file"
        raise
    # Features are cached per owner: a cache hit on another user's upload of the same
    # bytes would tell this user that someone else has their data (events, timing).
    owner = feature_scope(job.owner_id)
    if job.validation_file is not None:
        try:
            valid = load_dataset(file_read(file=job.validation_file))
        except DatasetFormatError as exc:
            exc.param = "validation_file"
            raise
        return JobSplits(
            examples,
            valid,
            f"{train_file.sha256}:{owner}",
            f"{job.validation_file.sha256}:{owner}",
        )
    train, valid = split_examples(
        examples, valid_fraction=VALID_FRACTION, seed=SPLIT_SEED, max_valid=MAX_VALID_EXAMPLES
    )
    train_digest, valid_digest = (
        split_digest(
            train_file.sha256,
            part=part,
            valid_fraction=VALID_FRACTION,
            max_valid=MAX_VALID_EXAMPLES,
            seed=SPLIT_SEED,
            scope=owner,
        )
        for part in ("train", "valid")
    )
    return JobSplits(train, valid, train_digest, valid_digest)


def job_options_field(job: FineTuningJob) -> str:
    """The job field holding its adapter's options: ``carry_on`` or ``tail``."""
    return "tail" if job.kind == "tail" else "carry_on"


def job_tail_config(job: FineTuningJob) -> Any:
    from customization.config import TailConfig

    options = job.tail
    return TailConfig(
        depth=int(options["depth"]),
        rank=int(options["rank"]),
        alpha=float(options["alpha"]),
        target_modules=tuple(options["target_modules"]),
        dropout=float(options["dropout"]),
        num_layers=int(job.base.fingerprint["num_layers"]),
    )


def job_adapter_config(job: FineTuningJob) -> Any:
    """The job's CarryOnConfig or TailConfig."""
    return job_tail_config(job) if job.kind == "tail" else job_carry_on_config(job)


def job_carry_on_config(job: FineTuningJob) -> Any:
    from customization.config import CarryOnConfig

    options = job.carry_on
    return CarryOnConfig(
        d_model=options["d_model"],
        n_blocks=options["n_blocks"],
        n_heads=options["n_heads"],
        mlp_ratio=options["mlp_ratio"],
        taps=tuple(options["taps"]),
        tap_mode=options["tap_mode"],
        alpha=options["alpha"],
        dropout=options["dropout"],
    )


def job_feature_config(job: FineTuningJob) -> Any:
    from customization.config import FeatureConfig

    options = job_options(job)
    if job.kind == "tail":  # one state: the input of the tail's first layer
        taps, include_final = (job_tail_config(job).first_layer,), False
    else:
        taps, include_final = tuple(options["taps"]), True
    return FeatureConfig(
        taps=taps,
        max_length=int(options["max_length"]),
        storage_dtype=options["storage_dtype"],
        include_final=include_final,
    )


def job_training_config(job: FineTuningJob) -> Any:
    """The resolved TrainingConfig (after validation replaced every "auto")."""
    from customization.config import TrainingConfig
    from customization.presets import base_learning_rate

    hp, options = job.hyperparameters, job_options(job)
    return TrainingConfig(
        epochs=int(hp["n_epochs"]),
        batch_size=int(hp["batch_size"]),
        learning_rate=base_learning_rate(job.kind, job.preset)  # type: ignore[arg-type]
        * float(hp["learning_rate_multiplier"]),
        seed=int(job.seed),
        checkpoint_every=int(options["checkpoint_every"]),
        early_stopping_patience=int(options["early_stopping_patience"]),
    )


def job_tokenize(job: FineTuningJob, examples: list[Any], *, max_length: int) -> list[Any]:
    """Tokenize with the job's base; an over-long example is an error naming its line."""
    from customization.tokenizer import tokenize_examples

    return tokenize_examples(
        examples, base_tokenizer(job.base), max_length=max_length, overflow="error"
    )


def job_split_file(job: FineTuningJob, part: str) -> File | None:
    """The file the ``"train"`` or ``"valid"`` split's examples come from."""
    if part == "train":
        return job.training_file
    return job.validation_file or job.training_file


def job_tokenized(
    job: FineTuningJob, examples: list[Any], *, part: str, max_length: int
) -> list[Any]:
    """The split's examples tokenized with the job's base: as the upload stored them, when
    they fit (``_stored_tokenization``), else tokenized now."""
    stored = _stored_tokenization(job, examples, part=part, max_length=max_length)
    reused = stored.examples([e.line for e in examples]) if stored is not None else None
    return reused if reused is not None else job_tokenize(job, examples, max_length=max_length)


def _stored_tokenization(
    job: FineTuningJob, examples: list[Any], *, part: str, max_length: int
) -> StoredTokenization | None:
    """The upload's tokenization of the split's file when it was made with the job's base's
    tokenizer and holds every example within ``max_length``. Stored examples are whole, so
    tokenizing again would give the same ids and masks; when one does not fit, tokenizing
    again names its line."""
    file = job_split_file(job, part)
    stored = file_tokenization(file=file, base=job.base) if file is not None else None
    if stored is None:
        return None
    lengths = [stored.length(example.line) for example in examples]
    return stored if all(n is not None and n <= max_length for n in lengths) else None


def _resolve(job: FineTuningJob, splits: JobSplits) -> tuple[dict[str, Any], dict[str, Any]]:
    """Replace every "auto" by a number, from the data."""
    from customization.errors import DatasetFormatError

    options = dict(job_options(job))
    limit = min(
        int(settings.CARRY_ON["MAX_EXAMPLE_TOKENS"]), int(settings.CARRY_ON["MAX_LENGTH_CAP"])
    )
    max_length = limit if options["max_length"] == "auto" else int(options["max_length"])
    lengths = []
    parts = (
        (splits.train, "train", "training_file"),
        (splits.valid, "valid", "validation_file"),
    )
    for examples, part, param in parts:
        try:
            lengths += _token_lengths(job, examples, part=part, max_length=max_length)
        except DatasetFormatError as exc:
            exc.param = param
            raise
    if options["max_length"] == "auto":
        options["max_length"] = max(8, max(lengths))
    hp = {
        key: AUTO_HYPERPARAMETERS[key] if value == "auto" else value
        for key, value in job.hyperparameters.items()
    }
    if job.hyperparameters.get("batch_size") == "auto":
        hp["batch_size"] = max(1, min(int(hp["batch_size"]), len(splits.train)))
    if options["checkpoint_every"] == "auto":
        total_steps = math.ceil(len(splits.train) / hp["batch_size"]) * hp["n_epochs"]
        options["checkpoint_every"] = max(1, math.ceil(total_steps / 5))
    return hp, options


def _token_lengths(
    job: FineTuningJob, examples: list[Any], *, part: str, max_length: int
) -> list[int]:
    """The examples' token counts, from the upload's tokenization when it fits."""
    stored = _stored_tokenization(job, examples, part=part, max_length=max_length)
    if stored is not None:
        return [stored.length(example.line) or 0 for example in examples]
    return [len(t.input_ids) for t in job_tokenize(job, examples, max_length=max_length)]


def _feature_set(job: FineTuningJob, digest: str, config: Any) -> FeatureSet:
    from customization.features import feature_cache_key

    if not job.base.fingerprint_key:
        raise ApplicationError(
            f"base model {job.base.name!r} has no fingerprint; register it again",
            param="model",
            code="base_model_not_ready",
        )
    key = feature_cache_key(
        base_keys=[job.base.fingerprint_key], dataset_sha256=digest, config=config
    )
    feature_set, _ = FeatureSet.objects.get_or_create(
        key=key,
        defaults={"base": job.base, "dataset_sha256": digest, "config": config.to_dict()},
    )
    ready = feature_set.status == FeatureSet.Status.READY
    if ready and not feature_set_complete(feature_set.path):
        feature_set.status = FeatureSet.Status.PENDING  # removed from disk: extract again
        feature_set.save(update_fields=["status", "updated_at"])
    return feature_set


def job_validate_files(*, job: FineTuningJob, worker: str) -> None:
    """Check the files against the job's base, resolve "auto" settings, queue the next stage.

    A job whose features are all cached goes straight to training (no embed worker needed).
    Raises CustomizationError / ApplicationError for bad data (the task fails the job).
    """
    splits = job_splits(job)
    hyperparameters, options = _resolve(job, splits)
    job.hyperparameters = hyperparameters
    setattr(job, job_options_field(job), options)
    config = job_feature_config(job)
    with transaction.atomic():
        train_fs = _feature_set(job, splits.train_digest, config)
        valid_fs = _feature_set(job, splits.valid_digest, config) if splits.valid else None
        cached = all(fs.status == FeatureSet.Status.READY for fs in (train_fs, valid_fs) if fs)
        stage = Stage.TRAINING if cached else Stage.EXTRACTING
        moved = job_transition(
            job=job,
            to=Status.QUEUED,
            only_worker=worker,
            stage=stage,
            worker="",
            heartbeat_at=None,
            attempts=0,
            hyperparameters=hyperparameters,
            train_features=train_fs,
            valid_features=valid_fs,
            **{job_options_field(job): options},
        )
        if not moved:
            return
        job_event_create(
            job=job,
            message=(
                f"Files validated: {len(splits.train)} training and {len(splits.valid)} "
                f"validation examples, up to {options['max_length']} tokens each"
            ),
        )
        if cached:
            job_event_create(
                job=job,
                message="Features of this dataset and base are cached; skipping extraction",
                data={"extraction_skipped": True},
            )
        enqueue_stage(job_id=job.id, stage=stage)


def job_parent_artifact(job: FineTuningJob) -> tuple[Path, str] | None:
    """Where a continued fine-tune's parent artifact is and its recorded sha256; None for a
    job that starts from scratch. A parent deleted since the job was created fails it."""
    if not job.parent_model:
        return None
    parent = Adapter.objects.filter(pk=job.parent_id).first() if job.parent_id else None
    if parent is None:
        raise ApplicationError(
            f"the model this job continues, {job.parent_model}, was deleted before training "
            "started",
            param="model",
            code="parent_model_deleted",
        )
    return data_path(parent.path), parent.sha256
