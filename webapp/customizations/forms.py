"""Server-rendered forms: they work without JavaScript."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django import forms

from customization.presets import ADAPTER_KINDS, DEFAULT_PRESET, PRESETS, base_learning_rate
from webapp.accounts.models import User
from webapp.customizations.models import Adapter, BaseModel, File
from webapp.customizations.options import (
    AUTO_HYPERPARAMETERS,
    CARRY_ON,
    HYPERPARAMETER_RANGES,
    TAIL,
    Option,
    options_of,
    resolve_default_taps,
)
from webapp.customizations.selectors import (
    adapter_list,
    base_model_default,
    base_model_list,
    file_list,
)
from webapp.customizations.services.jobs import MIN_TRAINING_EXAMPLES
from webapp.customizations.services.planning import MAX_VALID_EXAMPLES, VALID_FRACTION

RANGES = HYPERPARAMETER_RANGES
# Carry-on widths offered in the form (the API takes any valid width).
D_MODEL_CHOICES = (32, 64, 128, 256, 512)
CUSTOM = "custom"
PRESET_CHOICES = (
    *((name, name.capitalize()) for name in PRESETS),
    (CUSTOM, "Custom"),
)
KIND_CHOICES = (
    ("carry_on", "carry-on: a small branch reading cached states"),
    ("tail", "tail: LoRA on the base's top layers"),
)
# tap_mode always has a value (its initial), so it is never "set for the other kind".
_ALWAYS_SET = ("tap_mode",)


def kind_fields(kind: str) -> tuple[str, ...]:
    """The form's fields for a kind's options (the service names them carry_on.*, tail.*)."""
    options = options_of(kind).options
    return tuple(n for n, o in options.items() if o.form and n not in _ALWAYS_SET)


def option_form_field(option: Option) -> forms.Field:
    """A form field for an option the form does not declare by hand (empty: the default)."""
    arguments: dict[str, Any] = {
        "required": False,
        "label": option.name.replace("_", " ").capitalize(),
        "help_text": option.help,
    }
    if option.low is not None and option.types != (str,):
        arguments["min_value"] = option.low
    if option.high is not None and option.types != (str,):
        arguments["max_value"] = option.high
    if isinstance(option.form, Mapping):
        arguments.update(option.form)
    if option.types == (int,):
        return forms.IntegerField(**arguments)
    if option.types == (int, float):
        return forms.FloatField(**arguments)
    return forms.CharField(**arguments)


def add_option_fields(form: forms.Form) -> None:
    """Add a field for every form option of either kind that the form does not declare."""
    for kind in ADAPTER_KINDS:
        for name, option in options_of(kind).options.items():
            if option.form and name not in form.fields:
                form.fields[name] = option_form_field(option)


TAP_MODES = (
    ("mix", "mix: learned weighted sum of the taps at the input"),
    ("ladder", "ladder: each block adds its own tap (Ladder Side-Tuning)"),
)


class FileUploadForm(forms.Form):
    file = forms.FileField(
        label="JSONL dataset",
        widget=forms.ClearableFileInput(attrs={"accept": ".jsonl,.json,.txt,application/jsonl"}),
    )


class JobCreateForm(forms.Form):
    """A job on one file; empty numbers mean "auto", as in the API."""

    training_file = forms.ChoiceField(label="Training dataset")
    model = forms.ChoiceField(
        label="Base model",
        help_text="Or one of your adapters, to continue training it: the same base, kind, "
        "size and preset, starting from its weights (the preset and size fields then "
        "do not apply).",
    )
    preset = forms.ChoiceField(
        label="Preset",
        choices=PRESET_CHOICES,
        required=False,
        initial=DEFAULT_PRESET,
        widget=forms.RadioSelect,
    )
    kind = forms.ChoiceField(
        label="Adapter kind",
        choices=KIND_CHOICES,
        required=False,
        initial="carry_on",
        help_text="With Custom: which kind to train.",
    )
    validation_file = forms.ChoiceField(label="Validation dataset", required=False)
    # The ranges are the service's (HYPERPARAMETER_RANGES), so the form cannot drift from it.
    n_epochs = forms.IntegerField(
        min_value=int(RANGES["n_epochs"][1]),
        max_value=int(RANGES["n_epochs"][2]),
        required=False,
        label="Epochs",
    )
    learning_rate_multiplier = forms.FloatField(
        min_value=RANGES["learning_rate_multiplier"][1],
        max_value=RANGES["learning_rate_multiplier"][2],
        required=False,
        label="Learning-rate multiplier",
    )
    batch_size = forms.IntegerField(
        min_value=int(RANGES["batch_size"][1]),
        max_value=int(RANGES["batch_size"][2]),
        required=False,
        label="Batch size",
    )
    d_model = forms.TypedChoiceField(
        label="Carry-on width",
        coerce=int,
        required=False,
        empty_value=None,
        help_text="Hidden size of the carry-on's blocks (the paper's 1 MB carry-on is 128).",
    )
    n_blocks = forms.IntegerField(
        min_value=1, max_value=16, required=False, label="Carry-on blocks"
    )
    taps = forms.CharField(
        max_length=200,
        required=False,
        label="Taps",
        help_text="Hidden-state layers of the base to read, comma-separated: -1 is the final "
        "layer; 8,16,24 reads three layers.",
    )
    tap_mode = forms.ChoiceField(
        label="Tap mode", choices=TAP_MODES, required=False, help_text="Used with several taps."
    )
    depth = forms.IntegerField(
        min_value=1,
        max_value=1024,
        required=False,
        label="Tail depth",
        help_text="How many of the base's top layers get LoRA (at most the base's layers).",
    )
    rank = forms.IntegerField(min_value=1, max_value=256, required=False, label="Tail LoRA rank")
    suffix = forms.CharField(
        max_length=64,
        required=False,
        label="Name suffix",
        help_text="Becomes part of the model name; letters, digits, '-', '_' and '.'.",
    )
    seed = forms.IntegerField(min_value=0, max_value=2**31 - 1, required=False, label="Seed")

    def __init__(self, *args: Any, user: User, training_file: File | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        bases = list(base_model_list())
        self.bases = {base.name: base for base in bases}
        # A continued fine-tune runs on its parent's base; ``parents`` names them.
        parents = list(adapter_list(user=user).filter(base__enabled=True))
        self.parents = {adapter.name: adapter for adapter in parents}
        self.bases.update({adapter.name: adapter.base for adapter in parents})
        self.fields["model"].choices = [
            ("Base models", [(b.name, b.name) for b in bases]),
            *(
                [("Continue training an adapter", [(a.name, _adapter_label(a)) for a in parents])]
                if parents
                else []
            ),
        ]
        default = base_model_default()
        if default is not None:
            self.fields["model"].initial = default.name
        processed = list(file_list(user=user).filter(status=File.Status.PROCESSED))
        self.files = {f.id: f for f in processed}
        field = self.fields["training_file"]
        field.choices = [(f.id, _file_label(f)) for f in processed]
        if training_file is not None:
            # Fixed by the URL (the dataset page): not a choice the form offers.
            field.required = False
            field.disabled = True
            field.initial = training_file.id
            if training_file.id not in self.files:
                field.choices = [*field.choices, (training_file.id, _file_label(training_file))]
                self.files[training_file.id] = training_file
        others = [f for f in processed if training_file is None or f.id != training_file.id]
        self.fields["validation_file"].choices = [("", f"— hold out {held_out_text()} —")] + [
            (f.id, _file_label(f)) for f in others
        ]
        add_option_fields(self)
        self._placeholders()
        self._help_texts()

    # (legend, fields, the adapter kind they are for: "" for every job)
    FIELDSETS = (
        ("Data and base", ("training_file", "validation_file", "model"), ""),
        ("Training", ("n_epochs", "learning_rate_multiplier", "batch_size", "seed"), ""),
        ("Carry-on size and taps", ("d_model", "n_blocks", "taps", "tap_mode"), "carry_on"),
        ("Tail size", ("depth", "rank"), "tail"),
        ("Name", ("suffix",), ""),
    )

    def fieldsets(self) -> list[tuple[str, list[forms.BoundField], str]]:
        rows = []
        for legend, names, kind in self.FIELDSETS:
            extra = tuple(n for n in kind_fields(kind) if n not in names) if kind else ()
            rows.append((legend, [self[name] for name in (*names, *extra)], kind))
        return rows

    def custom_fields(self) -> list[forms.BoundField]:
        """Shown under the presets: what Custom adds (the kind)."""
        return [self["kind"]]

    def preset_options(self) -> list[tuple[forms.BoundField, str, str]]:
        """Each preset's radio button with its summary and its kind (Custom: the kind field's)."""
        rows: list[tuple[forms.BoundField, str, str]] = []
        for radio in self["preset"]:
            preset = PRESETS.get(str(radio.data["value"]))
            summary = preset.summary if preset else "choose the kind and its size below"
            rows.append((radio, summary, preset.kind if preset else ""))
        return rows

    def _placeholders(self) -> None:
        auto = AUTO_HYPERPARAMETERS
        self.fields["n_epochs"].widget.attrs["placeholder"] = f"auto ({auto['n_epochs']})"
        self.fields["batch_size"].widget.attrs["placeholder"] = f"auto ({auto['batch_size']})"
        self.fields["learning_rate_multiplier"].widget.attrs.update(
            placeholder=f"auto ({auto['learning_rate_multiplier']})", step="any"
        )
        default_width = CARRY_ON.defaults["d_model"]
        self.fields["d_model"].choices = [("", f"default ({default_width})")] + [
            (str(width), str(width)) for width in D_MODEL_CHOICES
        ]
        self.fields["n_blocks"].widget.attrs["placeholder"] = (
            f"default ({CARRY_ON.defaults['n_blocks']})"
        )
        self.fields["depth"].widget.attrs["placeholder"] = f"default ({TAIL.defaults['depth']})"
        self.fields["rank"].widget.attrs["placeholder"] = f"default ({TAIL.defaults['rank']})"
        default_taps = ",".join(str(t) for t in resolve_default_taps(None))
        self.fields["taps"].widget.attrs["placeholder"] = f"default ladder ({default_taps})"
        self.fields["tap_mode"].initial = CARRY_ON.defaults["tap_mode"]
        self.fields["seed"].widget.attrs["placeholder"] = "random"

    def _help_texts(self) -> None:
        """Help texts that state a default read it from where it is defined (the core's
        configs and presets), so they cannot go stale."""
        rates = ", ".join(f"{name} {preset.learning_rate:g}" for name, preset in PRESETS.items())
        self.fields["learning_rate_multiplier"].help_text = (
            f"Times the base learning rate: a carry-on's {base_learning_rate('carry_on'):g}, "
            f"a tail's {base_learning_rate('tail'):g}; with a preset, its own ({rates})."
        )
        minimum = f"At least {MIN_TRAINING_EXAMPLES} examples (as OpenAI requires)."
        self.fields["training_file"].help_text = minimum

    def clean_taps(self) -> list[int] | None:
        raw = self.cleaned_data["taps"].strip()
        if not raw:
            return None
        try:
            taps = [int(part) for part in raw.replace(" ", "").split(",") if part]
        except ValueError:
            raise forms.ValidationError("Taps are whole numbers separated by commas.") from None
        if not taps:
            return None
        if len(set(taps)) != len(taps):
            raise forms.ValidationError("A layer is listed twice.")
        return taps

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        base = self.bases.get(cleaned.get("model") or "")
        taps = cleaned.get("taps")
        layers = _num_layers(base)
        if taps and layers:
            wrong = [t for t in taps if not -(layers + 1) <= t <= layers]
            if wrong:
                self.add_error(
                    "taps",
                    f"{base} has hidden states 0..{layers} (or -1..-{layers + 1}); "
                    f"{wrong[0]} is out of range.",
                )
        depth = cleaned.get("depth")
        if depth and layers and depth > layers:
            self.add_error("depth", f"{base} has {layers} layers; the depth is at most {layers}.")
        if self.continues() is not None:
            for name in (*kind_fields("carry_on"), *kind_fields("tail")):
                if cleaned.get(name):
                    self.add_error(
                        name,
                        "A continued fine-tune keeps its parent's size; leave this empty.",
                    )
            return cleaned
        kind = self.adapter_kind()
        for other in ADAPTER_KINDS:
            names = kind_fields(other)
            for name in names:
                if other != kind and cleaned.get(name):
                    self.add_error(
                        name,
                        f"This option is for a {other.replace('_', '-')}; the chosen preset "
                        f"trains a {kind.replace('_', '-')} (choose Custom to change the kind).",
                    )
        return cleaned

    def continues(self) -> Any:
        """The adapter this job continues (chosen as its model), or None."""
        return self.parents.get(self.cleaned_data.get("model") or "")

    def preset_name(self) -> str | None:
        """The chosen preset; None for Custom (or a form posted without one), and for a
        continued fine-tune, which keeps its parent's."""
        name = self.cleaned_data.get("preset") or ""
        return name if name in PRESETS and self.continues() is None else None

    def adapter_kind(self) -> str:
        parent = self.continues()
        if parent is not None:
            return str(parent.kind)
        preset = self.preset_name()
        if preset is not None:
            return PRESETS[preset].kind
        return self.cleaned_data.get("kind") or "carry_on"

    def training_file_id(self) -> str:
        return str(self.cleaned_data.get("training_file") or self.fields["training_file"].initial)

    def hyperparameters(self) -> dict[str, Any]:
        names = ("n_epochs", "batch_size", "learning_rate_multiplier")
        return {name: self.cleaned_data[name] for name in names if self.cleaned_data[name]}

    def tail(self) -> dict[str, Any] | None:
        """A tail's options the user set (None for a carry-on); the service fills the rest."""
        if self.adapter_kind() != "tail" or self.continues() is not None:
            return None
        names = kind_fields("tail")
        return {name: self.cleaned_data[name] for name in names if self.cleaned_data.get(name)}

    def carry_on(self) -> dict[str, Any] | None:
        """Only the options the user set (None for a tail); the service fills the defaults."""
        if self.adapter_kind() != "carry_on" or self.continues() is not None:
            return None
        options: dict[str, Any] = {}
        for name in kind_fields("carry_on"):
            if self.cleaned_data.get(name):
                options[name] = self.cleaned_data[name]
        taps = options.get("taps") or resolve_default_taps(None)
        if self.cleaned_data.get("tap_mode") and len(taps) > 1:
            options["tap_mode"] = self.cleaned_data["tap_mode"]
        return options


def held_out_text() -> str:
    """What a job without a validation file holds out, as the pipeline defines it."""
    return f"{VALID_FRACTION:.0%} of the training set (at most {MAX_VALID_EXAMPLES} examples)"


def _adapter_label(adapter: Adapter) -> str:
    kind = f"tail of depth {adapter.depth}" if adapter.kind == "tail" else "carry-on"
    return f"{adapter.display_name} · {kind} on {adapter.base.name} ({adapter.name})"


def _file_label(file: File) -> str:
    return f"{file.filename} · {file.n_examples} examples ({file.id})"


def _num_layers(base: BaseModel | None) -> int | None:
    if base is None:
        return None
    layers = (base.fingerprint or {}).get("num_layers")
    return int(layers) if isinstance(layers, int) else None


class AdapterRenameForm(forms.Form):
    label = forms.CharField(max_length=100, required=False, label="Name")


class PlaygroundForm(forms.Form):
    """The playground without JavaScript: one prompt, one answer (or two, side by side)."""

    model = forms.CharField(max_length=512, label="Model")
    compare = forms.BooleanField(required=False, label="Side by side")
    compare_model = forms.CharField(max_length=512, required=False, label="Compare with")
    system = forms.CharField(
        required=False, max_length=4000, label="System prompt", widget=forms.Textarea({"rows": 2})
    )
    prompt = forms.CharField(max_length=8000, label="Message", widget=forms.Textarea({"rows": 3}))
    temperature = forms.FloatField(min_value=0, max_value=2, initial=0.7, label="Temperature")
    top_p = forms.FloatField(min_value=0.01, max_value=1, initial=1.0, label="Top p")
    max_tokens = forms.IntegerField(min_value=1, max_value=2048, initial=128, label="Max tokens")

    def messages(self) -> list[dict[str, str]]:
        system = self.cleaned_data["system"].strip()
        turns = [{"role": "system", "content": system}] if system else []
        return [*turns, {"role": "user", "content": self.cleaned_data["prompt"]}]

    def models(self) -> list[str]:
        names = [self.cleaned_data["model"]]
        if self.cleaned_data["compare"] and self.cleaned_data["compare_model"]:
            names.append(self.cleaned_data["compare_model"])
        return names


class EstimateQuery(forms.Form):
    """``GET /jobs/estimate/``: what the time estimate depends on."""

    training_file = forms.CharField(max_length=64)
    model = forms.CharField(max_length=128, required=False)
    n_epochs = forms.IntegerField(min_value=1, max_value=50, required=False)
    d_model = forms.IntegerField(min_value=8, max_value=8192, required=False)
    n_blocks = forms.IntegerField(min_value=1, max_value=64, required=False)
    preset = forms.CharField(max_length=16, required=False)
    kind = forms.ChoiceField(choices=KIND_CHOICES, required=False)
    depth = forms.IntegerField(min_value=1, max_value=1024, required=False)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        add_option_fields(self)

    def options(self) -> dict[str, Any]:
        """The adapter options given beyond the declared ones (for the estimate)."""
        declared = set(type(self).base_fields)
        return {
            n: v for n, v in self.cleaned_data.items() if n not in declared and v not in (None, "")
        }

    def adapter_kind(self) -> tuple[str, int | None]:
        """The kind and the tail depth asked for (a preset's, or Custom's fields)."""
        preset = PRESETS.get(self.cleaned_data["preset"] or "")
        if preset is not None:
            return preset.kind, self.cleaned_data["depth"] or preset.tail_depth(1024)
        return self.cleaned_data["kind"] or "carry_on", self.cleaned_data["depth"]
