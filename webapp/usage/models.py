"""One row per chat completion: who, with which key and model, how many tokens, how fast."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone

from webapp.core.models import public_id_field


class UsageRecord(models.Model):
    """A chat completion as it ended (written in batches, after the fact: services.py)."""

    class Outcome(models.TextChoices):
        STOP = "stop", "stopped"  # every choice ended at a stop token or string
        LENGTH = "length", "hit max tokens"  # at least one choice ran out of tokens
        ERROR = "error", "error"
        DISCONNECTED = "disconnected", "client disconnected"

    id = public_id_field("usage")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="usage_records"
    )
    # None: the browser (a session: the playground) rather than an API key
    api_key = models.ForeignKey(
        "accounts.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    model = models.CharField(max_length=512, help_text="The model name the request asked for.")
    # None for a base model or a checkpoint, and once the adapter is deleted (history stays)
    adapter = models.ForeignKey(
        "customizations.Adapter",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="usage_records",
    )
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    time_to_first_token = models.FloatField(
        null=True, blank=True, help_text="Seconds from arrival to the first token."
    )
    duration = models.FloatField(default=0.0, help_text="Seconds from arrival to the end.")
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    created_at = models.DateTimeField(
        default=timezone.now, db_index=True, help_text="When the request arrived."
    )

    class Meta:
        ordering = ["-created_at", "-pk"]
        indexes = [
            models.Index(fields=["user", "created_at"], name="usage_user_created"),
            models.Index(fields=["adapter", "created_at"], name="usage_adapter_created"),
        ]

    def __str__(self) -> str:
        return f"{self.model}: {self.total_tokens} tokens ({self.outcome})"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
