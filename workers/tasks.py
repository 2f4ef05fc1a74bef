"""Celery tasks: take a job id, claim the job, call the carry-on core, record through services.

Each stage is idempotent: a task whose job moved on, was cancelled or is held by a live
worker does nothing. Transient infrastructure errors (database, broker) are retried with
backoff; any other error fails the job with a clear ``{code, message, param}``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import InterfaceError, OperationalError
from kombu.exceptions import OperationalError as BrokerError

from webapp.core.exceptions import ApplicationError
from webapp.core.runtime import device, load_base, warm_up
from webapp.core.utils import data_path
from webapp.customizations.artifacts import (
    adapter_path,
    checkpoints_folder,
    features_root,
    remove_artifact,
)
from webapp.customizations.models import FeatureSet, FineTuningJob
from webapp.customizations.services.claims import job_claim, job_release
from webapp.customizations.services.jobs import job_event_create
from webapp.customizations.services.planning import (
    job_adapter_config,
    job_feature_config,
    job_parent_artifact,
    job_splits,
    job_tokenized,
    job_training_config,
    job_validate_files,
)
from webapp.customizations.services.results import (
    checkpoint_record,
    feature_set_ready,
    job_extraction_done,
    job_fail,
    job_record_metrics,
    job_succeed,
    job_training_resumed,
)
from webapp.metrics.stages import timed_stage
from workers import runtime
from workers.celery_app import app

logger = logging.getLogger(__name__)

TRANSIENT = (OperationalError, InterfaceError, BrokerError, ConnectionError, TimeoutError)
STAGE_OPTIONS: dict[str, Any] = {
    "bind": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "max_retries": 5,
}
Body = Callable[[FineTuningJob, str], None]


@timed_stage  # carry_on_job_stage_duration_seconds (README "Metrics")
def _run_stage(task: Any, job_id: str, stage: str, body: Body) -> str:
    """Claim, run, and turn every outcome into a job state (never an unfinished job)."""
    from customization.errors import CustomizationError, TrainingCancelled

    worker = runtime.worker_identity(task.request)
    job = job_claim(job_id=job_id, stage=stage, worker=worker)
    if job is None:
        logger.info("%s of %s: nothing to do (finished, cancelled or held)", stage, job_id)
        return "skipped"
    code, param = "internal_error", None
    try:
        # Eager tasks run inside the caller's transaction, which a second connection
        # could not see (nor wait out): the claim keeper is for real workers.
        if task.request.is_eager:
            body(job, worker)
        else:
            with runtime.ClaimKeeper(job_id, worker):
                body(job, worker)
        return "done"
    except TrainingCancelled:
        return "stopped"
    except TRANSIENT as exc:
        job_release(job_id=job_id, worker=worker)
        if task.request.retries < task.max_retries:
            countdown = min(300, 5 * 2**task.request.retries)
            logger.warning(
                "%s of %s: transient error %r; retry in %s s", stage, job_id, exc, countdown
            )
            raise task.retry(exc=exc, countdown=countdown) from exc
        code, message = "infrastructure_error", f"The {stage} stage kept failing: {exc}"
        worker = ""  # released above: fail it unless another worker took it since
    except OSError as exc:  # after TRANSIENT, which holds the network OSErrors
        logger.warning("%s of %s: storage error %r", stage, job_id, exc)
        code = "storage_error"
        message = f"The {stage} stage could not write to artifact storage: {_storage(exc)}"
    except (CustomizationError, ApplicationError) as exc:
        code, message, param = exc.code or "invalid_request", exc.message, exc.param
    except SoftTimeLimitExceeded:
        code, message = "timeout", f"The {stage} stage ran past its time limit"
    except Exception as exc:
        logger.exception("%s of %s failed", stage, job_id)
        message = f"Internal error during {stage}: {type(exc).__name__}: {exc}"
    failed = job_fail(job=job, worker=worker, code=code, message=message, param=param)
    return _outcome(failed, f"{stage} of {job_id}")


def _outcome(failed: bool, what: str) -> str:
    """A stage that could not record its failure had lost its claim first (taken over after
    a stall, cancelled, or finished by the worker that took over): its error is a symptom of
    that, e.g. a checkpoint folder the winner already cleaned up. It stops; not its job."""
    if failed:
        return "failed"
    logger.info("%s: the claim was lost before the error; stopping", what)
    return "stopped"


def _storage(exc: OSError) -> str:
    """The reason and, for a path under DATA_DIR, where (server paths stay private)."""
    reason = exc.strerror or type(exc).__name__
    if exc.filename:
        root, path = Path(settings.DATA_DIR).resolve(), Path(str(exc.filename)).resolve()
        if path == root or root in path.parents:
            return f"{reason} ({path.relative_to(root)})"
    return reason


# -- validation (queue default) ---------------------------------------------------------------


@app.task(**STAGE_OPTIONS, soft_time_limit=600, time_limit=660)
def validate_job_files(self: Any, job_id: str) -> str:
    """Check the files against the job's base and queue extraction or training."""
    return _run_stage(
        self, job_id, "validating", lambda job, worker: job_validate_files(job=job, worker=worker)
    )


# -- extraction (queue embed) -----------------------------------------------------------------


@app.task(**STAGE_OPTIONS)
def extract_job_features(self: Any, job_id: str) -> str:
    """Run the frozen base once over the job's data; cache its hidden states."""
    return _run_stage(self, job_id, FineTuningJob.Stage.EXTRACTING, _extract)


def _extract(job: FineTuningJob, worker: str) -> None:
    from customization.errors import TrainingCancelled
    from customization.pipeline import FeaturePart, StepHooks, extract

    heartbeat = runtime.Heartbeat(job, worker)
    job_event_create(
        job=job,
        message=f"Extracting hidden states with {job.base.name}",
        data={"worker": worker},
    )
    base = load_base(job.base)
    splits = job_splits(job)
    config = job_feature_config(job)
    todo = [
        (feature_set, examples, part)
        for feature_set, examples, part in (
            (job.train_features, splits.train, "train"),
            (job.valid_features, splits.valid, "valid"),
        )
        if feature_set is not None and feature_set.status != FeatureSet.Status.READY
    ]
    parts = [
        FeaturePart(
            record.key, job_tokenized(job, examples, part=part, max_length=config.max_length)
        )
        for record, examples, part in todo
    ]
    extract(
        base,
        parts,
        config,
        cache_dir=features_root(),
        hooks=StepHooks(
            progress=lambda done, total: heartbeat.update(done / max(1, total)),
            should_cancel=heartbeat.should_stop,
        ),
        on_ready=lambda index, result: feature_set_ready(
            feature_set=todo[index][0], path=result.path, manifest=result.manifest
        ),
    )
    heartbeat.beat(force=True)
    if heartbeat.stopped:
        raise TrainingCancelled("extraction stopped")
    job_extraction_done(job=job, worker=worker)


# -- training (queue train) -------------------------------------------------------------------


@app.task(**STAGE_OPTIONS)
def train_job(self: Any, job_id: str) -> str:
    """Train the carry-on on cached features, resuming from the newest checkpoint."""
    return _run_stage(self, job_id, FineTuningJob.Stage.TRAINING, _train)


class TrainingRecorder:
    """Turns the trainer's callbacks into job progress, metrics events and checkpoints."""

    def __init__(self, job: FineTuningJob, heartbeat: runtime.Heartbeat, epochs: int):
        self.job = job
        self.heartbeat = heartbeat
        self.epochs = epochs
        self.last_step: dict[str, Any] = {}

    def progress(self, p: dict[str, Any]) -> None:
        keys = ("step", "total_steps", "epoch", "train_loss", "learning_rate", "tokens_per_second")
        self.last_step = {key: p[key] for key in keys}
        job_record_metrics(
            job=self.job,
            data=self.last_step,
            message=f"Step {p['step']}/{p['total_steps']}: training loss={p['train_loss']:.4f}",
        )
        self.heartbeat.update(p["step"] / max(1, p["total_steps"]), p["trained_tokens"])

    def metrics(self, m: dict[str, Any]) -> None:
        data = {
            "step": m["step"],
            "epoch": m["epoch"],
            "epoch_train_loss": m["train_loss"],
            "valid_loss": m.get("valid_loss"),
            "valid_mean_token_accuracy": m.get("valid_token_accuracy"),
            "tokens_per_second": m["tokens_per_second"],
        }
        message = f"Epoch {m['epoch']}/{self.epochs}: training loss={m['train_loss']:.4f}"
        if m.get("valid_loss") is not None:
            message += (
                f", validation loss={m['valid_loss']:.4f}, "
                f"validation token accuracy={m['valid_token_accuracy']:.3f}"
            )
        job_record_metrics(job=self.job, data=data, message=message)

    def checkpoint(self, step: int, info: Any, epoch_metrics: dict[str, Any]) -> None:
        metrics = dict(self.last_step)
        if epoch_metrics.get("step") == step:
            metrics.update(valid_loss=epoch_metrics.get("valid_loss"))
        checkpoint_record(
            job=self.job,
            step=step,
            path=info.path,
            sha256=info.sha256,
            nbytes=info.nbytes,
            metrics=metrics,
        )


def _open_features(feature_set: FeatureSet | None, base_key: str) -> Any:
    from customization.errors import ArtifactError
    from customization.features import FeatureSet as CachedFeatures

    if feature_set is None or feature_set.status != FeatureSet.Status.READY:
        raise ArtifactError("the job's cached features are missing; retry the job to extract them")
    cached = CachedFeatures.open(data_path(feature_set.path))
    cached.check_base([base_key])
    return cached.load()


def _train(job: FineTuningJob, worker: str) -> None:
    """A training node: cached features plus what the adapter runs, never the whole base."""
    from customization.base_model import BaseFingerprint
    from customization.checkpoint import latest_checkpoint_step, load_initial_weights
    from customization.pipeline import StepHooks, save, train
    from customization.training import load_training_node

    heartbeat = runtime.Heartbeat(job, worker)
    fingerprint = BaseFingerprint.from_dict(job.base.fingerprint)
    train_data = _open_features(job.train_features, fingerprint.key)
    valid_data = _open_features(job.valid_features, fingerprint.key) if job.valid_features else None
    config, training = job_adapter_config(job), job_training_config(job)
    checkpoints = data_path(checkpoints_folder(job.id))
    resumed_at = latest_checkpoint_step(checkpoints)
    # A continued fine-tune starts from its parent's weights, checked like any artifact
    # load; a resumed run starts from its own checkpoint instead.
    parent = job_parent_artifact(job) if resumed_at is None else None
    initial = None
    if parent is not None:
        initial = load_initial_weights(
            parent[0],
            config=config,
            base_fingerprints=[fingerprint],
            expected_sha256=parent[1],
            device=device(),
        )
    if resumed_at is not None:
        job_training_resumed(job=job, step=resumed_at, worker=worker)
    else:
        start = f" from the weights of {job.parent_model}" if parent is not None else ""
        job_event_create(
            job=job,
            message=f"Training started on {len(train_data)} examples{start}",
            data={"worker": worker},
        )
    warm_up()
    adapter, head_weight = load_training_node(
        job.base.path, config, seed=training.seed, device=device()
    )
    recorder = TrainingRecorder(job, heartbeat, training.epochs)
    result = train(
        adapter,
        head_weight,
        train_data,
        training,
        fingerprint=fingerprint,
        valid_data=valid_data,
        checkpoint_dir=checkpoints,
        resume=True,
        initial_weights=initial,
        hooks=StepHooks(
            should_cancel=heartbeat.should_stop,
            on_step=recorder.progress,
            on_metrics=recorder.metrics,
            on_checkpoint=recorder.checkpoint,
        ),
    )
    relative = adapter_path(job.id)  # this attempt's own: a loser removes only it
    info = save(
        result.carry_on,
        data_path(relative),
        fingerprint=fingerprint,
        metadata={"job": job.id, "name": job.model_name, "parent": job.parent_model or None},
    )
    last = result.history[-1] if result.history else {}
    adapter = job_succeed(
        job=job,
        worker=worker,
        path=info.path,
        sha256=info.sha256,
        nbytes=info.nbytes,
        n_parameters=info.num_parameters,
        trained_tokens=result.trained_tokens,
        metrics={
            "steps": result.steps,
            "trained_tokens": result.trained_tokens,
            "best_epoch": result.best_epoch,
            "best_valid_loss": result.best_valid_loss,
            "stopped_early": result.stopped_early,
            "train_loss": last.get("train_loss"),
            "valid_loss": last.get("valid_loss"),
            "valid_mean_token_accuracy": last.get("valid_token_accuracy"),
        },
    )
    if adapter is None:  # cancelled at the last moment: the artifact has no record
        remove_artifact(relative)


# -- evaluations (queue embed: it holds the base) ---------------------------------------------


@app.task(**STAGE_OPTIONS)
def run_evaluation(self: Any, evaluation_id: str) -> str:
    """Score an evaluation's models on its held-out file; every outcome becomes its state."""
    from customization.errors import CustomizationError, TrainingCancelled
    from webapp.evaluations import services as evaluations

    worker = runtime.worker_identity(self.request)
    evaluation = evaluations.evaluation_claim(evaluation_id=evaluation_id, worker=worker)
    if evaluation is None:
        logger.info("evaluation %s: nothing to do (finished, cancelled or held)", evaluation_id)
        return "skipped"
    code, param = "internal_error", None
    try:
        _evaluate(evaluation, worker)
        return "done"
    except TrainingCancelled:
        return "stopped"
    except TRANSIENT as exc:
        evaluations.evaluation_release(evaluation_id=evaluation_id, worker=worker)
        if self.request.retries < self.max_retries:
            raise self.retry(exc=exc, countdown=min(300, 5 * 2**self.request.retries)) from exc
        code, message = "infrastructure_error", f"The evaluation kept failing: {exc}"
        worker = ""
    except OSError as exc:  # after TRANSIENT, which holds the network OSErrors
        code, message = "storage_error", f"The evaluation could not read its files: {_storage(exc)}"
    except (CustomizationError, ApplicationError) as exc:
        code, message, param = exc.code or "invalid_request", exc.message, exc.param
    except SoftTimeLimitExceeded:
        code, message = "timeout", "The evaluation ran past its time limit"
    except Exception as exc:
        logger.exception("evaluation %s failed", evaluation_id)
        message = f"Internal error during the evaluation: {type(exc).__name__}: {exc}"
    failed = evaluations.evaluation_fail(
        evaluation=evaluation, worker=worker, code=code, message=message, param=param
    )
    return _outcome(failed, f"evaluation {evaluation_id}")


def _evaluate(evaluation: Any, worker: str) -> None:
    """One base forward over the file serves every model (customization.evaluate_models)."""
    from customization.checkpoint import load_adapter
    from customization.errors import CustomizationError, DatasetFormatError
    from customization.evaluation import evaluate_models
    from webapp.evaluations import services as evaluations

    base = load_base(evaluation.base)
    examples = evaluations.evaluation_examples(evaluation=evaluation)
    evaluations.evaluation_start(evaluation=evaluation, examples=examples)
    results = list(evaluation.results.order_by("position"))
    models = []
    for result in results:
        try:
            models.append(
                None
                if result.kind == "base"
                else load_adapter(
                    data_path(result.path),
                    base_fingerprints=[base.fingerprint()],
                    expected_sha256=result.sha256,
                    device=base.device,
                )
            )
        except CustomizationError as exc:
            exc.message, exc.param = f"{result.model}: {exc.message}", "models"
            raise
    try:
        evaluate_models(
            base,
            models,
            examples,
            max_length=evaluation.max_length,
            exact_match_problems=evaluation.exact_match,
            max_new_tokens=evaluation.max_tokens,
            on_scores=lambda i, scores: evaluations.evaluation_record_scores(
                result=results[i], scores=scores
            ),
            should_stop=lambda fraction: (
                not evaluations.evaluation_progress(
                    evaluation=evaluation, worker=worker, fraction=fraction
                )
            ),
        )
    except DatasetFormatError as exc:  # an example with no answer token within max_length
        exc.code, exc.param = "invalid_file", "file"
        raise
    evaluations.evaluation_succeed(evaluation=evaluation, worker=worker)
