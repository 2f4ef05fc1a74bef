"""Evaluations: creation (checked like the API's other resources), the worker's records, cancel.

Status machine::

    queued -> running -> succeeded | failed | cancelled   (cancel from queued or running)

Every change is a conditional UPDATE on the status it was read in (as a job's), so a worker
finishing and a user cancelling cannot both win. Figures are recorded as they become known:
an evaluation that fails or is cancelled keeps what it measured, and its error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Case, F, Q, Value, When
from django.db.models.functions import Coalesce
from django.utils import timezone

from webapp.accounts.models import User
from webapp.celery import task_send
from webapp.core.exceptions import (
    ApplicationError,
    ConflictError,
    NotFoundError,
    ServiceUnavailableError,
)
from webapp.core.models import status_update
from webapp.core.utils import finite_json
from webapp.customizations import selectors as customizations
from webapp.customizations.models import Adapter, BaseModel, Checkpoint, File
from webapp.customizations.quotas import quota_check_active
from webapp.customizations.selectors import file_read
from webapp.evaluations.models import Evaluation, EvaluationResult

logger = logging.getLogger(__name__)
Status = Evaluation.Status
Kind = EvaluationResult.Kind

# The CLI's defaults (``python -m customization eval``), so both measure the same by default.
DEFAULT_MAX_LENGTH = 512
DEFAULT_MAX_TOKENS = 256
DEFAULT_EXACT_MATCH = 16
MIN_MAX_LENGTH = 8
# What a stored answer keeps of a long generation (the page shows a few lines of it).
SAMPLE_CHARS = 4000
RUN_EVALUATION = "workers.tasks.run_evaluation"


# -- creation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PickedModel:
    name: str
    kind: str
    base: BaseModel
    adapter: Adapter | None = None
    checkpoint: Checkpoint | None = None
    path: str = ""
    sha256: str = ""


def evaluation_create(
    *,
    user: User,
    file: str | File,
    models: Any,
    limit: int | None = None,
    max_length: int | None = None,
    exact_match: int | None = None,
    max_tokens: int | None = None,
) -> Evaluation:
    """Check the request, create the evaluation and its result rows, enqueue it on commit.

    ``models``: names of the base, the caller's adapters or their checkpoints, all on one
    base. A name the caller cannot use (missing, another user's) is a 404 naming ``models``.
    If the broker does not take the task, the evaluation is withdrawn and 503 is raised.
    """
    picked = _resolve_models(user, models)
    held_out = _resolve_file(user, file)
    options = _check_options(
        held_out, limit=limit, max_length=max_length, exact_match=exact_match,
        max_tokens=max_tokens,
    )  # fmt: skip
    with transaction.atomic():
        _quota_check_active(user)
        evaluation = Evaluation.objects.create(
            owner=user, base=picked[0].base, file=held_out, filename=held_out.filename, **options
        )
        EvaluationResult.objects.bulk_create(
            EvaluationResult(
                evaluation=evaluation,
                position=position,
                model=model.name,
                kind=model.kind,
                adapter=model.adapter,
                checkpoint=model.checkpoint,
                path=model.path,
                sha256=model.sha256,
            )
            for position, model in enumerate(picked)
        )
        transaction.on_commit(lambda: _send_or_withdraw(evaluation.id))
    return evaluation


def _resolve_models(user: User, names: Any) -> list[PickedModel]:
    limit = int(settings.CARRY_ON["EVALUATION_MAX_MODELS"])
    if not isinstance(names, list | tuple) or not names:
        raise ApplicationError("models must be a non-empty list of model names", param="models")
    if not all(isinstance(name, str) and name for name in names):
        raise ApplicationError("every entry of models must be a model name", param="models")
    if len(names) > limit:
        raise ApplicationError(
            f"an evaluation compares at most {limit} models (CARRY_ON_EVALUATION_MAX_MODELS)",
            param="models",
            code="option_above_limit",
        )
    repeated = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if repeated is not None:
        raise ApplicationError(f"the model {repeated!r} is listed twice", param="models")
    picked = [_pick(user, name) for name in names]
    bases = sorted({model.base.name for model in picked})
    if len(bases) > 1:
        raise ApplicationError(
            f"the models of one evaluation must share one base model; these use {bases}",
            param="models",
            code="models_on_different_bases",
        )
    return picked


def _pick(user: User, name: str) -> PickedModel:
    try:
        resolved = customizations.model_resolve(user=user, name=name)
    except NotFoundError:
        raise NotFoundError(
            f"The model '{name}' does not exist or you do not have access to it.", param="models"
        ) from None
    if resolved.adapter_id is None:
        return PickedModel(name=name, kind=Kind.BASE, base=resolved.base)
    adapter = checkpoint = None
    if resolved.adapter_id == name:
        adapter = customizations.adapter_get(user=user, name=name)
    else:
        checkpoint = customizations.checkpoint_get(user=user, checkpoint_id=resolved.adapter_id)
    return PickedModel(
        name=name,
        kind=Kind.ADAPTER if adapter is not None else Kind.CHECKPOINT,
        base=resolved.base,
        adapter=adapter,
        checkpoint=checkpoint,
        path=resolved.path or "",
        sha256=resolved.sha256 or "",
    )


def _resolve_file(user: User, value: str | File) -> File:
    file_id = value.id if isinstance(value, File) else value
    if not isinstance(file_id, str) or not file_id:
        raise ApplicationError("file must be the id of one of your files", param="file")
    file = customizations.file_list(user=user).filter(pk=file_id).first()
    if file is None:
        raise ApplicationError(f"invalid file: {file_id}", param="file", code="invalid_file")
    if file.status != File.Status.PROCESSED:
        problems = file.problems
        reason = problems[0]["message"] if problems else "it is not processed yet"
        raise ApplicationError(
            f"{file_id} did not pass validation: {reason}", param="file", code="invalid_file"
        )
    if file.n_examples < 1:
        raise ApplicationError(f"{file_id} holds no examples", param="file", code="invalid_file")
    return file


def _check_options(
    file: File,
    *,
    limit: int | None,
    max_length: int | None,
    exact_match: int | None,
    max_tokens: int | None,
) -> dict[str, int]:
    """Each option in its range; a value past the operator's cap names the setting."""
    caps = settings.CARRY_ON
    max_examples = int(caps["EVALUATION_MAX_EXAMPLES"])
    max_problems = int(caps["EVALUATION_MAX_PROBLEMS"])
    return {
        "limit": _bounded(
            "limit", limit, min(file.n_examples, max_examples), 1, max_examples,
            "CARRY_ON_EVALUATION_MAX_EXAMPLES",
        ),
        "max_length": _bounded(
            "max_length", max_length, DEFAULT_MAX_LENGTH, MIN_MAX_LENGTH,
            int(caps["MAX_LENGTH_CAP"]), "CARRY_ON_MAX_LENGTH_CAP",
        ),
        "exact_match": _bounded(
            "exact_match", exact_match, min(DEFAULT_EXACT_MATCH, max_problems), 0, max_problems,
            "CARRY_ON_EVALUATION_MAX_PROBLEMS",
        ),
        "max_tokens": _bounded(
            "max_tokens", max_tokens, min(DEFAULT_MAX_TOKENS, int(caps["EVALUATION_MAX_TOKENS"])),
            1, int(caps["EVALUATION_MAX_TOKENS"]), "CARRY_ON_EVALUATION_MAX_TOKENS",
        ),
    }  # fmt: skip


def _bounded(name: str, value: Any, default: int, low: int, high: int, setting: str) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApplicationError(f"{name} must be an integer", param=name)
    if value < low:
        raise ApplicationError(f"{name} must be at least {low}", param=name)
    if value > high:
        raise ApplicationError(
            f"{name} may be at most {high} on this service ({setting})",
            param=name,
            code="option_above_limit",
        )
    return value


def _quota_check_active(user: User) -> None:
    """Refuse one more while the user has MAX_ACTIVE_EVALUATIONS_PER_USER unfinished ones."""
    quota_check_active(
        user=user,
        model=Evaluation,
        setting="MAX_ACTIVE_EVALUATIONS_PER_USER",
        what="evaluations queued or running",
        code="active_evaluations_quota_exceeded",
    )


def _send_or_withdraw(evaluation_id: str) -> None:
    from kombu.exceptions import OperationalError as BrokerError

    try:
        task_send(RUN_EVALUATION, args=[evaluation_id])  # the route picks the embed queue
    except (BrokerError, OSError) as exc:
        logger.warning("could not send evaluation %s to the broker: %s", evaluation_id, exc)
        # Untouched by any worker (none got a message): take it back.
        Evaluation.objects.filter(pk=evaluation_id, status=Status.QUEUED, worker="").delete()
        raise ServiceUnavailableError(
            "The job queue (message broker) is unreachable right now; nothing was created. "
            "Retry shortly.",
            code="broker_unavailable",
        ) from exc


# -- cancel -----------------------------------------------------------------------------------


def evaluation_cancel(*, evaluation: Evaluation) -> Evaluation:
    """Cancel a queued or running evaluation; a running task stops at its next progress."""
    for _ in range(3):  # the status may change under us (queued -> running)
        if evaluation.is_terminal:
            raise ConflictError(
                f"evaluation {evaluation.id} is {evaluation.status} and cannot be cancelled",
                code="invalid_transition",
            )
        if _transition(evaluation, Status.CANCELLED):
            return evaluation
        evaluation.refresh_from_db()
    raise ConflictError(f"evaluation {evaluation.id} changed while cancelling; try again")


def _transition(
    evaluation: Evaluation, to: str, *, only_worker: str | None = None, **fields: Any
) -> bool:
    """Move to ``to`` if still in the status it was read in (and held by ``only_worker``)."""
    return status_update(evaluation, to, only_worker=only_worker, **fields)


# -- what the worker records ------------------------------------------------------------------


def evaluation_claim(*, evaluation_id: str, worker: str) -> Evaluation | None:
    """Take the evaluation to run it, or None: finished, cancelled, or held by a live worker.

    A redelivered task (its worker died) takes it over once the heartbeat is stale; one
    whose workers died more than MAX_ATTEMPTS times fails with ``worker_lost``.
    """
    now = timezone.now()
    stale = now - timedelta(seconds=int(settings.CARRY_ON["HEARTBEAT_TIMEOUT"]))
    claimed = (
        Evaluation.objects.filter(pk=evaluation_id, status__in=[Status.QUEUED, Status.RUNNING])
        .filter(Q(worker="") | Q(worker=worker) | Q(heartbeat_at__lt=stale))
        .update(
            status=Status.RUNNING,
            worker=worker,
            heartbeat_at=now,
            updated_at=now,
            started_at=Coalesce(F("started_at"), Value(now)),
            attempts=Case(When(worker=worker, then=F("attempts")), default=F("attempts") + 1),
        )
    )
    if not claimed:
        return None
    evaluation = Evaluation.objects.select_related("base", "file").get(pk=evaluation_id)
    if evaluation.attempts > int(settings.CARRY_ON["MAX_ATTEMPTS"]):
        evaluation_fail(
            evaluation=evaluation,
            worker=worker,
            code="worker_lost",
            message=f"The worker running this evaluation stopped {evaluation.attempts - 1} "
            "times (killed or out of memory); giving up.",
        )
        return None
    return evaluation


def evaluation_sweep_stale() -> list[str]:
    """Send again every running evaluation whose worker stopped sending progress (killed,
    machine lost); the next claim restarts it, or fails it after MAX_ATTEMPTS. Run by every
    worker's sweeper (workers/runtime.py); the conditional UPDATE lets one of them act."""
    now = timezone.now()
    stale = now - timedelta(seconds=int(settings.CARRY_ON["HEARTBEAT_TIMEOUT"]))
    candidates = Evaluation.objects.filter(status=Status.RUNNING, heartbeat_at__lt=stale)
    swept = []
    for evaluation_id in list(candidates.values_list("pk", flat=True)):
        with transaction.atomic():
            # heartbeat_at = now: sent again at most once per timeout, even when unsent
            taken = Evaluation.objects.filter(pk=evaluation_id, heartbeat_at__lt=stale).update(
                worker="", heartbeat_at=now
            )
            if taken:
                transaction.on_commit(lambda pk=evaluation_id: _send_quietly(pk))
                swept.append(evaluation_id)
    return swept


def _send_quietly(evaluation_id: str) -> None:
    """A send the broker refuses is logged; a sweep after the next timeout tries again."""
    from kombu.exceptions import OperationalError as BrokerError

    try:
        task_send(RUN_EVALUATION, args=[evaluation_id])
    except (BrokerError, OSError) as exc:
        logger.warning("could not send evaluation %s again: %s", evaluation_id, exc)


def evaluation_release(*, evaluation_id: str, worker: str) -> None:
    """Give the claim back (before a retry), so the next delivery may take it at once."""
    Evaluation.objects.filter(pk=evaluation_id, worker=worker).update(worker="", heartbeat_at=None)


def evaluation_examples(*, evaluation: Evaluation) -> list[Any]:
    """The held-out examples to score (the first ``limit``), parsed from the stored file."""
    from customization.datasets import load_dataset
    from customization.errors import DatasetFormatError

    if evaluation.file is None:
        raise ApplicationError("the held-out file was deleted", param="file", code="file_missing")
    try:
        examples = load_dataset(file_read(file=evaluation.file))
    except DatasetFormatError as exc:
        exc.param = "file"
        raise
    return examples[: evaluation.limit]


def evaluation_start(*, evaluation: Evaluation, examples: Sequence[Any]) -> None:
    """Record what will be measured: the examples scored and the problems to decode (the
    core's checkable sample), so answers recorded later have their question beside them."""
    from customization.answers import checkable_examples, extract_final_answer

    problems = []
    for example in checkable_examples(examples)[: evaluation.exact_match]:
        messages = list(example.messages)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        users = [m["content"] for m in messages[:last] if m["role"] == "user"]
        reference = messages[last]["content"]
        problems.append(
            {
                "line": example.line,
                "prompt": users[-1] if users else "",
                "reference": reference,
                "answer": extract_final_answer(reference),
            }
        )
    evaluation.n_examples, evaluation.n_problems = len(examples), len(problems)
    evaluation.problems = problems
    Evaluation.objects.filter(pk=evaluation.pk).update(
        n_examples=len(examples), n_problems=len(problems), problems=problems
    )


def evaluation_progress(*, evaluation: Evaluation, worker: str, fraction: float) -> bool:
    """Progress (0..1), doubling as the heartbeat; False once cancelled or taken over."""
    return bool(
        Evaluation.objects.filter(pk=evaluation.pk, worker=worker, status=Status.RUNNING).update(
            progress=min(1.0, max(0.0, fraction)), heartbeat_at=timezone.now()
        )
    )


def evaluation_record_scores(*, result: EvaluationResult, scores: Any) -> None:
    """One model's figures (a ``customization.evaluation.ModelScores``), as far as known."""
    from customization.answers import answers_match, extract_final_answer

    result.loss, result.token_accuracy = scores.loss, scores.token_accuracy
    result.exact_match, result.n_correct = scores.exact_match, None
    result.samples = []
    if scores.predictions is not None:
        result.n_correct = scores.n_correct
        problems = result.evaluation.problems
        for problem, text in zip(problems, scores.predictions, strict=True):
            answer = extract_final_answer(text)
            result.samples.append(
                {
                    "text": text[:SAMPLE_CHARS],
                    "answer": answer,
                    "correct": answers_match(answer, problem["answer"]),
                }
            )
    result.loss = finite_json(result.loss)
    result.token_accuracy = finite_json(result.token_accuracy)
    result.save(update_fields=["loss", "token_accuracy", "exact_match", "n_correct", "samples"])


def evaluation_succeed(*, evaluation: Evaluation, worker: str) -> bool:
    return _transition(evaluation, Status.SUCCEEDED, only_worker=worker, progress=1.0)


def evaluation_fail(
    *,
    evaluation: Evaluation,
    code: str,
    message: str,
    param: str | None = None,
    worker: str | None = None,
) -> bool:
    """Fail with a clear error; False if it already finished (e.g. was cancelled)."""
    evaluation.refresh_from_db(fields=["status", "worker"])
    if evaluation.is_terminal:
        return False
    error = {"code": code, "message": message, "param": param}
    return _transition(evaluation, Status.FAILED, only_worker=worker, error=error)
