"""Reads of evaluations, always filtered by the requesting user (another's id is a 404)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db.models import Prefetch, QuerySet

from webapp.accounts.models import User
from webapp.core.utils import first_or_not_found
from webapp.customizations import selectors as customizations
from webapp.customizations.models import Adapter, BaseModel, Checkpoint, File
from webapp.evaluations.models import Evaluation, EvaluationResult

_RESULTS = Prefetch("results", queryset=EvaluationResult.objects.order_by("position"))


def evaluation_list(*, user: User) -> QuerySet[Evaluation]:
    rows = Evaluation.objects.filter(owner=user).select_related("base", "file")
    return rows.prefetch_related(_RESULTS).order_by("-created_at")


def evaluation_get(*, user: User, evaluation_id: str) -> Evaluation:
    return first_or_not_found(
        evaluation_list(user=user).filter(pk=evaluation_id),
        f"No evaluation with id {evaluation_id}",
        param="evaluation_id",
    )


@dataclass(frozen=True)
class ProblemRow:
    """One decoded problem with every model's answer beside it (None: not decoded yet)."""

    number: int
    problem: dict[str, Any]
    pairs: list[tuple[EvaluationResult, dict[str, Any] | None]]


@dataclass(frozen=True)
class EvaluationPage:
    evaluation: Evaluation
    results: list[EvaluationResult]
    problems: list[ProblemRow]


def evaluation_page_get(*, user: User, evaluation_id: str) -> EvaluationPage:
    """The evaluation, its models in the order picked, and the decoded problems side by side."""
    evaluation = evaluation_get(user=user, evaluation_id=evaluation_id)
    results = list(evaluation.results.all())
    rows = [
        ProblemRow(
            number=index + 1,
            problem=problem,
            pairs=[(r, r.samples[index] if index < len(r.samples) else None) for r in results],
        )
        for index, problem in enumerate(evaluation.problems)
    ]
    return EvaluationPage(evaluation=evaluation, results=results, problems=rows)


@dataclass(frozen=True)
class EvaluableModels:
    """What a user may evaluate: enabled bases, their active adapters and those adapters'
    checkpoints, each with the name the API takes."""

    bases: list[BaseModel]
    adapters: list[Adapter]
    checkpoints: list[tuple[str, Checkpoint]]


def evaluable_models(*, user: User) -> EvaluableModels:
    adapters = list(
        customizations.adapter_list(user=user, active_only=True).filter(base__enabled=True)
    )
    checkpoints = (
        Checkpoint.objects.filter(job__owner=user, job__base__enabled=True)
        .select_related("job__base", "job__owner")
        .order_by("-job__created_at", "step")
    )
    return EvaluableModels(
        bases=list(customizations.base_model_list()),
        adapters=adapters,
        checkpoints=[(c.model_name, c) for c in checkpoints[:200]],
    )


def evaluable_files(*, user: User) -> list[File]:
    """The user's validated files with at least one example."""
    rows = customizations.file_list(user=user).filter(
        status=File.Status.PROCESSED, n_examples__gt=0
    )
    return list(rows[:200])
