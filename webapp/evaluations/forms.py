"""The new-evaluation form: it works without JavaScript (checkboxes for the models)."""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings

from webapp.evaluations.selectors import EvaluableModels
from webapp.evaluations.services import DEFAULT_MAX_LENGTH, DEFAULT_MAX_TOKENS


class EvaluationCreateForm(forms.Form):
    """Empty numbers take the service's defaults, as in the API."""

    file = forms.ChoiceField(label="Held-out dataset")
    models = forms.MultipleChoiceField(
        label="Models",
        widget=forms.CheckboxSelectMultiple,
        help_text="The base and any of your adapters or checkpoints on it, side by side.",
    )
    limit = forms.IntegerField(
        min_value=1,
        required=False,
        label="Examples scored for loss",
        help_text="The first N examples of the file (default: all).",
    )
    exact_match = forms.IntegerField(
        min_value=0,
        required=False,
        label="Problems decoded for exact match",
        help_text='Greedy answers to the first N problems whose answer ends in "#### N" '
        "(default 16; 0: none).",
    )
    max_tokens = forms.IntegerField(
        min_value=1,
        required=False,
        label="Tokens per answer",
        help_text=f"New tokens per decoded answer (default {DEFAULT_MAX_TOKENS}).",
    )
    max_length = forms.IntegerField(
        min_value=8,
        required=False,
        label="Tokens per example",
        help_text=f"Longer examples are cut for the loss (default {DEFAULT_MAX_LENGTH}).",
    )

    def __init__(self, *args: Any, files: list[Any], models: EvaluableModels, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fields["file"].choices = [
            (f.id, f"{f.filename} ({f.n_examples} examples)") for f in files
        ]
        choices: list[tuple[str, str]] = [(b.name, f"{b.name} (base)") for b in models.bases]
        choices += [
            (a.name, f"{a.display_name} (adapter on {a.base.name})") for a in models.adapters
        ]
        choices += [(name, f"{name} (checkpoint)") for name, _ in models.checkpoints]
        self.fields["models"].choices = choices
        self.fields["exact_match"].max_value = int(settings.CARRY_ON["EVALUATION_MAX_PROBLEMS"])

    OPTIONS = ("limit", "exact_match", "max_tokens", "max_length")

    @property
    def option_fields(self) -> list[forms.BoundField]:
        return [self[name] for name in self.OPTIONS]

    def options(self) -> dict[str, int | None]:
        return {key: self.cleaned_data[key] for key in self.OPTIONS}
