"""Evaluations: several models scored side by side on one held-out file.

An evaluation holds what was asked (file, options) and its state; each model gets one
``EvaluationResult`` row, created with the evaluation and filled in by the worker as its
figures become known, so a failed or cancelled evaluation keeps what it had measured.
The row keeps the model's artifact path and sha256 as they were when it was picked.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models

from webapp.core.models import ClaimedModel, public_id_field
from webapp.customizations.models import Adapter, BaseModel, Checkpoint, File


class Evaluation(ClaimedModel):
    """Held-out loss and exact match of a base and its adapters on one file (queue embed)."""

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    id = public_id_field("eval")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    base = models.ForeignKey(BaseModel, on_delete=models.PROTECT, related_name="evaluations")
    file = models.ForeignKey(
        File, on_delete=models.SET_NULL, null=True, blank=True, related_name="evaluations"
    )
    filename = models.CharField(max_length=255, help_text="The file's name, kept for display.")
    # What was asked: examples scored for loss, tokens per example, problems decoded for
    # exact match (0: none) and new tokens per answer.
    limit = models.IntegerField()
    max_length = models.IntegerField()
    exact_match = models.IntegerField()
    max_tokens = models.IntegerField()
    # What was done: examples scored, problems with a checkable "#### N" answer decoded, and
    # those problems (prompt, reference), once known.
    n_examples = models.IntegerField(null=True, blank=True)
    n_problems = models.IntegerField(null=True, blank=True)
    problems = models.JSONField(default=list, blank=True)
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True
    )
    progress = models.FloatField(default=0.0)
    error = models.JSONField(null=True, blank=True)

    TERMINAL = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["owner", "-created_at"])]


class EvaluationResult(models.Model):
    """One model of an evaluation and its figures (null until measured)."""

    class Kind(models.TextChoices):
        BASE = "base"
        ADAPTER = "adapter"
        CHECKPOINT = "checkpoint"

    evaluation = models.ForeignKey(Evaluation, on_delete=models.CASCADE, related_name="results")
    position = models.IntegerField()
    model = models.CharField(max_length=512, help_text="The model name as picked.")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    adapter = models.ForeignKey(
        Adapter, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    checkpoint = models.ForeignKey(
        Checkpoint, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    path = models.CharField(max_length=512, blank=True, help_text="Artifact, relative to DATA_DIR.")
    sha256 = models.CharField(max_length=64, blank=True)
    loss = models.FloatField(null=True, blank=True)
    token_accuracy = models.FloatField(null=True, blank=True)
    exact_match = models.FloatField(null=True, blank=True)
    n_correct = models.IntegerField(null=True, blank=True)
    # One per decoded problem, in the evaluation's ``problems`` order: the answer, the final
    # answer read from it, and whether it matches the reference's.
    samples = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["evaluation", "position"]
        constraints = [
            models.UniqueConstraint(fields=["evaluation", "position"], name="one_result_per_slot")
        ]

    def __str__(self) -> str:
        return f"{self.evaluation_id} · {self.model}"
