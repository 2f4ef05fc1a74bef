"""Server-rendered forms: they work without JavaScript."""

from __future__ import annotations

from typing import Any

from django import forms

from webapp.accounts.models import User
from webapp.customizations.models import File
from webapp.customizations.selectors import base_model_default, base_model_list, file_list


class FileUploadForm(forms.Form):
    file = forms.FileField(
        label="JSONL dataset",
        widget=forms.ClearableFileInput(attrs={"accept": ".jsonl,.json,.txt,application/jsonl"}),
    )


class JobCreateForm(forms.Form):
    """A job on one file; empty numbers mean "auto", as in the API."""

    model = forms.ChoiceField(label="Base model")
    validation_file = forms.ChoiceField(label="Validation file", required=False)
    n_epochs = forms.IntegerField(min_value=1, max_value=50, required=False, label="Epochs")
    batch_size = forms.IntegerField(min_value=1, max_value=256, required=False)
    learning_rate_multiplier = forms.FloatField(
        min_value=0.001, max_value=10, required=False, label="Learning-rate multiplier"
    )
    suffix = forms.CharField(max_length=64, required=False)
    seed = forms.IntegerField(min_value=0, max_value=2**31 - 1, required=False)

    def __init__(self, *args: Any, user: User, exclude_file: str | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.fields["model"].choices = [(b.name, b.name) for b in base_model_list()]
        default = base_model_default()
        if default is not None:
            self.fields["model"].initial = default.name
        files = file_list(user=user).filter(status=File.Status.PROCESSED).exclude(pk=exclude_file)
        self.fields["validation_file"].choices = [("", "— split the training file —")] + [
            (f.id, f"{f.filename} ({f.id})") for f in files
        ]

    def hyperparameters(self) -> dict[str, Any]:
        names = ("n_epochs", "batch_size", "learning_rate_multiplier")
        return {name: self.cleaned_data[name] for name in names if self.cleaned_data[name]}
