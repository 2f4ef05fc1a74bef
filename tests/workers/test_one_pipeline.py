"""The pipeline steps exist once: a job through the Celery workers, the CLI's `train` and
the training benchmark run the same steps (customization.pipeline) and so reach the same
held-out loss on the same data and settings.

The benchmark is its per-run child, ``bench.train_runs`` (what every training benchmark
starts), called in process with a spec: its ``--quick`` entry points take the first N
problems of a file as training data rather than the job's seeded split, so they cannot
repeat a job.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from tests.factories import UserFactory
from tests.helpers.carry_on_kit import toy_jsonl
from tests.helpers.celery_workers import Workers
from webapp.customizations.models import FineTuningJob
from webapp.customizations.services.files import file_create
from webapp.customizations.services.jobs import job_create

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def _job_settings(job: FineTuningJob) -> tuple[Any, Any, Any]:
    """The carry-on shape, training and feature configs the job resolved."""
    from webapp.customizations.services.planning import (
        job_adapter_config,
        job_feature_config,
        job_training_config,
    )

    return job_adapter_config(job), job_training_config(job), job_feature_config(job)


def _cli_argv(job: FineTuningJob, data: Path, out: Path, base_dir: Path) -> list[str]:
    """The CLI's `train` with the settings the job resolved (split as the job splits)."""
    from webapp.customizations.services.planning import SPLIT_SEED, VALID_FRACTION

    shape, training, features = _job_settings(job)
    assert training.seed == SPLIT_SEED  # the CLI splits with the training seed
    return [
        "train", str(data), "--base", str(base_dir), "--out", str(out),
        "--cache-dir", str(out / "features"),
        "--epochs", str(training.epochs), "--batch-size", str(training.batch_size),
        "--lr", repr(training.learning_rate), "--seed", str(training.seed),
        "--patience", str(training.early_stopping_patience),
        "--d-model", str(shape.d_model), "--blocks", str(shape.n_blocks),
        "--heads", str(shape.n_heads), "--tap-mode", shape.tap_mode,
        "--taps", *[str(t) for t in shape.taps],
        "--max-length", str(features.max_length), "--storage-dtype", features.storage_dtype,
        "--valid-fraction", str(VALID_FRACTION),
    ]  # fmt: skip


def _bench_held_out_loss(job: FineTuningJob, data: Path, work: Path, base_dir: Path) -> float:
    """The benchmark child's extract and carry-on runs with the settings the job resolved."""
    from bench import train_runs
    from webapp.customizations.services.planning import (
        MAX_VALID_EXAMPLES,
        SPLIT_SEED,
        VALID_FRACTION,
    )

    shape, training, features = _job_settings(job)
    spec: dict[str, Any] = {
        "base_dir": str(base_dir), "cache_dir": str(work / "features"),
        "data": str(data), "valid_fraction": VALID_FRACTION, "split_seed": SPLIT_SEED,
        "max_valid": MAX_VALID_EXAMPLES,
        "taps": list(features.taps), "max_length": features.max_length,
        "storage_dtype": features.storage_dtype,
        "held_out_storage_dtype": features.storage_dtype,
        "epochs": training.epochs, "batch_size": training.batch_size, "seed": training.seed,
        "learning_rate": training.learning_rate,
        "early_stopping_patience": training.early_stopping_patience,
    }  # fmt: skip
    extraction = train_runs.run_extract(spec)
    run = train_runs.run_carry_on(
        spec
        | {key: extraction[key] for key in ("train_dir", "held_out_dir", "fingerprint")}
        | {"carry_on": shape.to_dict(), "out_dir": str(work / "adapter")}
    )
    assert run["learning_rate"] == training.learning_rate
    return float(run["epochs"][-1]["valid_loss"])


def test_worker_job_cli_train_and_benchmark_reach_the_same_held_out_loss(
    tiny_base_model: Any,
    tiny_base_dir: Path,
    workers: Callable[..., Workers],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A job on the embed and train workers, `train` on the CLI and the benchmark's run:
    equal held-out loss."""
    from customization import cli
    from customization.config import CarryOnConfig
    from webapp.customizations.services.planning import job_adapter_config

    pool = workers()
    pool.start("embed", "default,embed")
    pool.start("train", "train")
    data = toy_jsonl(20)
    user = UserFactory()
    file = file_create(user=user, upload=SimpleUploadedFile("toy.jsonl", data))
    job = job_create(
        user=user, training_file=file.id, seed=0,
        hyperparameters={"n_epochs": 1, "batch_size": 4},
        carry_on={"d_model": 16, "n_heads": 2, "taps": [1, -1]},
    )  # fmt: skip
    job = pool.succeeded(job, timeout=300)
    shape = job_adapter_config(job)
    cli_shape = CarryOnConfig(
        d_model=shape.d_model,
        n_blocks=shape.n_blocks,
        n_heads=shape.n_heads,
        taps=shape.taps,
        tap_mode=shape.tap_mode,
    )
    assert shape == cli_shape  # every option the CLI leaves at its default agrees
    job_loss = job.events.filter(type="metrics", data__has_key="valid_loss").get().data
    path = tmp_path / "toy.jsonl"
    path.write_bytes(data)
    capsys.readouterr()

    assert cli.main(_cli_argv(job, path, tmp_path / "cli", tiny_base_dir)) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["history"][-1]["valid_loss"] == pytest.approx(
        job_loss["valid_loss"], rel=1e-6, abs=1e-6
    )
    bench_loss = _bench_held_out_loss(job, path, tmp_path / "bench", tiny_base_dir)
    assert bench_loss == pytest.approx(job_loss["valid_loss"], rel=1e-6, abs=1e-6)
