"""Fine-tuning jobs: creation (validated like OpenAI's API), the status machine, cancel, retry.

Status machine::

    validating_files -> queued -> running -> succeeded | failed | cancelled
    (cancel from validating_files, queued or running; retry: failed -> validating_files)

Every transition is a conditional UPDATE on the current status, so a worker finishing a job
and a user cancelling it cannot both win.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction

from customization.config import CarryOnConfig, TailConfig, TrainingConfig, default_taps
from customization.presets import PRESETS, Preset, get_preset
from webapp.accounts.models import User
from webapp.core.exceptions import ApplicationError, ConflictError, ServiceUnavailableError
from webapp.core.models import status_update
from webapp.core.utils import remove_artifact
from webapp.customizations.models import Adapter, BaseModel, File, FineTuningJob, JobEvent
from webapp.customizations.quotas import quota_check_active_jobs

logger = logging.getLogger(__name__)
Status = FineTuningJob.Status

ALLOWED_TRANSITIONS: dict[str, frozenset[str]] = {
    Status.VALIDATING_FILES: frozenset({Status.QUEUED, Status.FAILED, Status.CANCELLED}),
    Status.QUEUED: frozenset({Status.RUNNING, Status.FAILED, Status.CANCELLED}),
    Status.RUNNING: frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED}),
    Status.FAILED: frozenset({Status.VALIDATING_FILES}),  # an operator's retry
    Status.SUCCEEDED: frozenset(),
    Status.CANCELLED: frozenset(),
}
CANCELLABLE = (Status.VALIDATING_FILES, Status.QUEUED, Status.RUNNING)

# The web app's defaults are the core's (customization.config), so a job submitted with
# no options trains exactly the carry-on the quality study picked (docs/carry_on_quality.md).
_TRAINING = TrainingConfig()
_SHAPE = CarryOnConfig()
# The carry-on's peak learning rate at learning_rate_multiplier = 1.
BASE_LEARNING_RATE = _TRAINING.learning_rate
AUTO_HYPERPARAMETERS = {
    "n_epochs": _TRAINING.epochs,
    "batch_size": _TRAINING.batch_size,
    "learning_rate_multiplier": 1.0,
}
HYPERPARAMETER_RANGES: dict[str, tuple[type, float, float]] = {
    "n_epochs": (int, 1, 50),
    "batch_size": (int, 1, 256),
    "learning_rate_multiplier": (float, 1e-3, 10.0),
}
CARRY_ON_DEFAULTS: dict[str, Any] = {
    # the carry-on's shape (customization.config.CarryOnConfig); "auto" taps: the default
    # ladder for the job's base (customization.config.default_taps)
    "d_model": _SHAPE.d_model,
    "n_blocks": _SHAPE.n_blocks,
    "n_heads": _SHAPE.n_heads,
    "mlp_ratio": _SHAPE.mlp_ratio,
    "taps": "auto",
    "tap_mode": _SHAPE.tap_mode,
    "alpha": _SHAPE.alpha,
    "dropout": _SHAPE.dropout,
    # feature extraction (part of the feature-cache key)
    "max_length": "auto",
    "storage_dtype": "float16",
    # training extras
    "checkpoint_every": "auto",
    "early_stopping_patience": 0,
}
_TAIL = TailConfig()
TAIL_DEFAULTS: dict[str, Any] = {
    # the tail's shape (customization.config.TailConfig): LoRA on the base's top ``depth``
    # layers; a depth above the base's is refused, except a preset's, clamped (DESIGN §1b)
    "depth": _TAIL.depth,
    "rank": _TAIL.rank,
    "alpha": _TAIL.alpha,
    "target_modules": list(_TAIL.target_modules),
    "dropout": _TAIL.dropout,
    # the same extraction and training extras as a carry-on's
    "max_length": "auto",
    "storage_dtype": "float16",
    "checkpoint_every": "auto",
    "early_stopping_patience": 0,
}
_TAIL_SHAPE_KEYS = ("depth", "rank", "alpha", "target_modules", "dropout")
_SHAPE_KEYS = (
    "d_model",
    "n_blocks",
    "n_heads",
    "mlp_ratio",
    "taps",
    "tap_mode",
    "alpha",
    "dropout",
)
_SUFFIX_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


# -- creation ---------------------------------------------------------------------------------


def job_create(
    *,
    user: User,
    training_file: str | File,
    model: str | BaseModel | None = None,
    validation_file: str | File | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    suffix: str | None = None,
    seed: int | None = None,
    metadata: Mapping[str, Any] | None = None,
    carry_on: Mapping[str, Any] | None = None,
    preset: str | None = None,
    tail: Mapping[str, Any] | None = None,
) -> FineTuningJob:
    """Validate the request, create the job and enqueue file validation once committed.

    A job trains one adapter kind (DESIGN §1b): a carry-on (``carry_on`` options) or a tail
    (``tail`` options). A ``preset`` picks the kind and fills defaults; options given with
    it win over the preset's. A ``model`` naming one of the user's adapters continues it, as
    OpenAI's API does: the same base, kind, shape and preset, starting from its weights.

    If the broker does not take the task, the job is withdrawn (deleted) and
    ``ServiceUnavailableError`` (503) is raised: the caller retries, and no job waits for a
    message that was never sent.
    """
    parent = _resolve_parent(user, model)
    base = _resolve_base(parent.base if parent is not None else model)
    train = _resolve_file(user, training_file, "training_file")
    _check_training_size(train)
    valid = _resolve_file(user, validation_file, "validation_file") if validation_file else None
    if parent is not None:
        preset_name, kind, shape = _continued_options(
            parent, base=base, preset=preset, carry_on=carry_on, tail=tail
        )
    else:
        chosen = _resolve_preset(preset)
        preset_name = chosen.name if chosen else ""
        kind = _job_kind(chosen, carry_on=carry_on, tail=tail)
        if kind == "tail":
            shape = {"tail": _check_tail(tail or {}, base=base, preset=chosen), "carry_on": {}}
        else:
            options = _check_carry_on(carry_on or {}, base=base, preset=chosen)
            shape = {"carry_on": options, "tail": {}}
    with transaction.atomic():
        quota_check_active_jobs(user=user)
        job = FineTuningJob.objects.create(
            owner=user,
            base=base,
            parent=parent,
            parent_model=parent.name if parent is not None else "",
            training_file=train,
            validation_file=valid,
            hyperparameters=_check_hyperparameters(hyperparameters or {}),
            kind=kind,
            preset=preset_name,
            **shape,
            suffix=_check_suffix(suffix),
            seed=_check_seed(seed),
            metadata=_check_metadata(metadata),
        )
        job_event_create(job=job, message=f"Validating training file: {train.id}")
        transaction.on_commit(lambda: _send_or_withdraw(job.id))
    return job


def _send_or_withdraw(job_id: str) -> None:
    try:
        send_stage(job_id=job_id, stage="validating")
    except ServiceUnavailableError:
        # Still untouched by any worker (none got a message): take the job back.
        FineTuningJob.objects.filter(pk=job_id, status=Status.VALIDATING_FILES, worker="").delete()
        raise


def _resolve_base(model: str | BaseModel | None) -> BaseModel:
    if isinstance(model, BaseModel):
        base: BaseModel | None = model if model.enabled else None
    elif model:
        base = BaseModel.objects.filter(name=model, enabled=True).first()
    else:
        base = BaseModel.objects.filter(is_default=True, enabled=True).first()
    if base is None:
        shown = model.name if isinstance(model, BaseModel) else model
        message = (
            f"The model {shown!r} does not exist or cannot be fine-tuned"
            if shown
            else "No default base model is registered"
        )
        raise ApplicationError(message, param="model", code="model_not_available")
    return base


def _resolve_parent(user: User, model: str | BaseModel | None) -> Adapter | None:
    """The user's adapter a fine-tuned ``model`` name (``ft:...``) continues; None for a base.

    Another user's adapter answers 404 exactly as a missing one does (never tell which). A
    checkpoint is servable but not a parent: its job's fine-tuned model is.
    """
    from webapp.customizations.selectors import adapter_list, model_resolve

    if not isinstance(model, str) or not model.startswith("ft:"):
        return None
    adapter = adapter_list(user=user).filter(name=model).first()
    if adapter is not None:
        return adapter
    model_resolve(user=user, name=model)  # NotFoundError (404) unless it is theirs
    raise ApplicationError(
        f"{model} is a checkpoint; continue fine-tuning from its job's fine-tuned model "
        "instead (a checkpoint cannot be a job's model)",
        param="model",
        code="model_not_available",
    )


def _continued_options(
    parent: Adapter,
    *,
    base: BaseModel,
    preset: str | None,
    carry_on: Mapping[str, Any] | None,
    tail: Mapping[str, Any] | None,
) -> tuple[str, str, dict[str, Any]]:
    """A continued fine-tune's preset, kind and options: the parent's kind and shape plus the
    extras the request gives (max_length, ...). An option that contradicts the parent's
    shape, a preset other than its, or the other kind's options are 400s naming them."""
    source = parent.job
    if source is None or not job_options(source):
        raise ApplicationError(
            f"the job that trained {parent.name} was deleted, so its shape is unknown; "
            "it cannot be fine-tuned further",
            param="model",
            code="model_not_available",
        )
    kind, spelled = source.kind, source.kind.replace("_", "-")
    if preset not in (None, "") and preset != source.preset:
        trained = f"preset {source.preset!r}" if source.preset else "no preset (custom)"
        raise ApplicationError(
            f"{parent.name} was trained with {trained}; a continued fine-tune keeps its "
            "parent's preset (leave preset out)",
            param="preset",
        )
    other = "tail" if kind == "carry_on" else "carry_on"
    if _given(tail if other == "tail" else carry_on):
        raise ApplicationError(
            f"{parent.name} is a {spelled}: {other} options do not apply to continuing it",
            param=other,
        )
    given = (tail if kind == "tail" else carry_on) or {}
    _check_known(given, TAIL_DEFAULTS if kind == "tail" else CARRY_ON_DEFAULTS, kind)
    keys = _TAIL_SHAPE_KEYS if kind == "tail" else _SHAPE_KEYS
    shape = {key: job_options(source)[key] for key in keys}
    for key in keys:
        if key in given and _normalized(key, given[key], base) != shape[key]:
            raise ApplicationError(
                f"{kind}.{key} is {shape[key]!r} in {parent.name}; a continued fine-tune "
                "keeps its parent's shape (leave the option out)",
                param=f"{kind}.{key}",
            )
    values = {**given, **shape}
    if kind == "tail":
        return source.preset, kind, {"tail": _check_tail(values, base=base), "carry_on": {}}
    return source.preset, kind, {"carry_on": _check_carry_on(values, base=base), "tail": {}}


def _normalized(key: str, value: Any, base: BaseModel) -> Any:
    """An option as a job stores it once resolved, to compare with a parent's."""
    if key == "taps" and value == "auto":
        return list(resolve_default_taps(base))
    if key == "target_modules" and value == "all-linear":
        return list(_TAIL.target_modules)
    return list(value) if isinstance(value, tuple) else value


def job_options(job: FineTuningJob) -> dict[str, Any]:
    """The adapter's options (shape, feature and training extras) of either kind."""
    options: dict[str, Any] = job.tail if job.kind == "tail" else job.carry_on
    return options


# OpenAI refuses a training file with fewer examples: too few to learn from, and a user
# would rather hear so at once than from a job that ran.
MIN_TRAINING_EXAMPLES = 10


def _check_training_size(file: File) -> None:
    if file.n_examples < MIN_TRAINING_EXAMPLES:
        raise ApplicationError(
            f"Training file {file.id} has {file.n_examples} example(s), but must have at "
            f"least {MIN_TRAINING_EXAMPLES} examples",
            param="training_file",
            code="invalid_n_examples",
        )


def _resolve_file(user: User, value: str | File, param: str) -> File:
    from webapp.customizations.selectors import file_list

    file_id = value.id if isinstance(value, File) else str(value)
    file = file_list(user=user).filter(id=file_id).first()
    if file is None:
        raise ApplicationError(f"invalid {param}: {file_id}", param=param, code="invalid_file")
    if file.purpose != "fine-tune":
        raise ApplicationError(
            f"{file_id} has purpose {file.purpose!r}, not 'fine-tune'", param=param
        )
    if file.status != File.Status.PROCESSED:
        raise ApplicationError(
            f"{file_id} did not pass validation: {_first_problem(file)}",
            param=param,
            code=f"invalid_{param}",
        )
    return file


def _first_problem(file: File) -> str:
    problems = file.problems
    if not problems:
        return "it is not processed yet"
    first = problems[0]
    where = f"line {first['line']}: " if first.get("line") else ""
    return f"{where}{first['message']} ({len(problems)} problem(s) in all)"


def _check_hyperparameters(values: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(values, Mapping):
        raise ApplicationError("hyperparameters must be an object", param="hyperparameters")
    unknown = sorted(set(values) - set(HYPERPARAMETER_RANGES))
    if unknown:
        raise ApplicationError(
            f"unknown hyperparameter {unknown[0]!r}; allowed: {', '.join(HYPERPARAMETER_RANGES)}",
            param=f"hyperparameters.{unknown[0]}",
        )
    checked: dict[str, Any] = {}
    for name, (kind, low, high) in HYPERPARAMETER_RANGES.items():
        value = values.get(name, "auto")
        param = f"hyperparameters.{name}"
        if value == "auto":
            checked[name] = "auto"
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ApplicationError(f"{name} must be 'auto' or a number", param=param)
        if not math.isfinite(value):
            raise ApplicationError(f"{name} must be a finite number", param=param)
        if kind is int and value != int(value):
            raise ApplicationError(f"{name} must be an integer", param=param)
        if not low <= value <= high:
            raise ApplicationError(f"{name} must be between {low} and {high}", param=param)
        checked[name] = kind(value)
    return checked


def _check_carry_on(
    values: Mapping[str, Any], *, base: BaseModel | None = None, preset: Preset | None = None
) -> dict[str, Any]:
    from customization.config import FeatureConfig

    _check_known(values, CARRY_ON_DEFAULTS, "carry_on")
    _check_carry_on_types(values)
    options = {**CARRY_ON_DEFAULTS, **(preset.options if preset else {}), **values}
    if options["taps"] == "auto":
        options["taps"] = list(resolve_default_taps(base))
    try:
        shape = {key: options[key] for key in _SHAPE_KEYS}
        shape["taps"] = tuple(shape["taps"])
        CarryOnConfig(**shape)
        FeatureConfig(
            taps=shape["taps"],
            max_length=512 if options["max_length"] == "auto" else options["max_length"],
            storage_dtype=options["storage_dtype"],
        )
    except (TypeError, ValueError) as exc:
        raise ApplicationError(f"invalid carry_on options: {exc}", param="carry_on") from None
    _check_extras(options, "carry_on")
    options["taps"] = list(shape["taps"])
    _check_carry_on_size(options, base)
    return options


def _check_known(values: Any, allowed: Mapping[str, Any], kind: str) -> None:
    """An object of options, each one ``allowed`` names; a 400 names the first other."""
    if not isinstance(values, Mapping):
        raise ApplicationError(f"{kind} must be an object", param=kind)
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ApplicationError(
            f"unknown {kind} option {unknown[0]!r}; allowed: {', '.join(allowed)}",
            param=f"{kind}.{unknown[0]}",
        )


def _check_extras(options: Mapping[str, Any], kind: str) -> None:
    """The extraction and training extras both kinds take (the last four of
    CARRY_ON_DEFAULTS and TAIL_DEFAULTS), with the operator's caps; ``kind`` names the param."""
    from customization.config import FeatureConfig

    for key in ("max_length", "checkpoint_every"):
        value = options[key]
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ApplicationError(f"{key} must be 'auto' or an integer", param=f"{kind}.{key}")
    cap = int(settings.CARRY_ON["MAX_LENGTH_CAP"])
    if options["max_length"] != "auto" and options["max_length"] > cap:
        raise ApplicationError(
            f"max_length may be at most {cap} tokens on this service",
            param=f"{kind}.max_length",
            code="option_above_limit",
        )
    for key in ("max_length", "storage_dtype"):
        if options[key] != "auto":
            try:
                FeatureConfig(**{key: options[key]})
            except ValueError as exc:
                raise ApplicationError(str(exc), param=f"{kind}.{key}") from None
    patience = options["early_stopping_patience"]
    if isinstance(patience, bool) or not isinstance(patience, int) or not 0 <= patience <= 100:
        raise ApplicationError(
            "early_stopping_patience must be an integer in [0, 100]",
            param=f"{kind}.early_stopping_patience",
        )


def _resolve_preset(name: str | None) -> Preset | None:
    if name is None or name == "":
        return None
    if not isinstance(name, str):
        raise ApplicationError(f"preset must be one of {', '.join(PRESETS)}", param="preset")
    try:
        return get_preset(name)
    except ValueError as exc:
        raise ApplicationError(str(exc), param="preset", code="invalid_preset") from None


def _given(options: Any) -> bool:
    return options is not None and not (isinstance(options, Mapping) and not options)


def _job_kind(preset: Preset | None, *, carry_on: Any, tail: Any) -> str:
    """The adapter kind: the preset's, else the kind whose options were given."""
    if _given(carry_on) and _given(tail):
        raise ApplicationError(
            "give carry_on or tail options, not both: a job trains one adapter kind",
            param="tail",
        )
    if preset is None:
        return "tail" if _given(tail) else "carry_on"
    other = "tail" if preset.kind == "carry_on" else "carry_on"
    if _given(tail if other == "tail" else carry_on):
        raise ApplicationError(
            f"preset {preset.name!r} trains a {preset.kind.replace('_', '-')}; "
            f"{other} options do not apply to it",
            param=other,
        )
    return preset.kind


def _check_tail(
    values: Mapping[str, Any], *, base: BaseModel, preset: Preset | None = None
) -> dict[str, Any]:
    """Tail options (TAIL_DEFAULTS) checked one by one with TailConfig, so a 400 names one."""
    _check_known(values, TAIL_DEFAULTS, "tail")
    options = {**TAIL_DEFAULTS, **(preset.options if preset else {}), **values}
    layers = base_num_layers(base)
    if "depth" not in values and layers:
        # A preset's or the default depth fits any base ("best": every layer); a depth the
        # user gave is checked against the base instead.
        options["depth"] = min(int(options["depth"]), layers)
    if options["target_modules"] == "all-linear":  # PEFT's spelling
        options["target_modules"] = list(_TAIL.target_modules)
    _check_tail_types(options)
    for key in _TAIL_SHAPE_KEYS:
        value = options[key]
        given: dict[str, Any] = {key: tuple(value) if key == "target_modules" else value}
        if key == "depth":
            given["num_layers"] = layers
        try:
            TailConfig(**given)
        except ValueError as exc:
            raise ApplicationError(f"invalid tail option: {exc}", param=f"tail.{key}") from None
    options["target_modules"] = list(options["target_modules"])
    _check_extras(options, "tail")
    _check_tail_size(options, base)
    return options


_TAIL_TYPES: dict[str, tuple[type, ...]] = {
    "depth": (int,),
    "rank": (int,),
    "alpha": (int, float),
    "dropout": (int, float),
    "storage_dtype": (str,),
}


def _check_tail_types(options: Mapping[str, Any]) -> None:
    for key, kinds in _TAIL_TYPES.items():
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, kinds):
            kind = (
                "a string" if kinds == (str,) else "an integer" if kinds == (int,) else "a number"
            )
            raise ApplicationError(f"{key} must be {kind}", param=f"tail.{key}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ApplicationError(f"{key} must be a finite number", param=f"tail.{key}")
    modules = options["target_modules"]
    if not isinstance(modules, list | tuple) or not all(isinstance(m, str) for m in modules):
        raise ApplicationError(
            'target_modules must be "all-linear" or a list of module names',
            param="tail.target_modules",
        )


def base_num_layers(base: BaseModel | None) -> int:
    """The base's decoder layers (its fingerprint's ``num_layers``); 0 when unknown."""
    layers = (base.fingerprint if base else {}).get("num_layers")
    return layers if isinstance(layers, int) and not isinstance(layers, bool) else 0


def base_linear_shapes(base: BaseModel | None) -> dict[str, tuple[int, int]]:
    """(in, out) features of each decoder-layer linear a tail may adapt.

    Read from the base folder's ``config.json`` (Llama-family names); without it, a
    Llama-shaped guess from the fingerprint's width (full attention, an MLP 8/3 as wide).
    """
    hidden = int((base.fingerprint if base else {}).get("hidden_size") or 576)
    config: dict[str, Any] = {}
    if base is not None and base.path:
        with contextlib.suppress(OSError, ValueError):
            config = json.loads((Path(base.path) / "config.json").read_text())
    hidden = int(config.get("hidden_size") or hidden)
    inner = int(config.get("intermediate_size") or round(hidden * 8 / 3))
    heads = int(config.get("num_attention_heads") or 1)
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv = int(config.get("num_key_value_heads") or heads) * head_dim
    attention = heads * head_dim
    return {
        "q_proj": (hidden, attention),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (attention, hidden),
        "gate_proj": (hidden, inner),
        "up_proj": (hidden, inner),
        "down_proj": (inner, hidden),
    }


def tail_parameters(options: Mapping[str, Any], base: BaseModel | None) -> int:
    """LoRA's trained parameters: depth × Σ over target modules of rank × (in + out)."""
    shapes = base_linear_shapes(base)
    per_layer = sum(int(options["rank"]) * sum(shapes[m]) for m in options["target_modules"])
    return int(options["depth"]) * per_layer


def _check_tail_size(options: Mapping[str, Any], base: BaseModel) -> None:
    """The carry-on's ceiling, for the same reason: a worker (and the cache) must hold it."""
    estimate = tail_parameters(options, base)
    limit = min(
        int(settings.CARRY_ON["MAX_CARRY_ON_PARAMETERS"]),
        int(settings.CARRY_ON["SERVING_ADAPTER_CACHE_BYTES"]) // 4,
    )
    if estimate > limit:
        raise ApplicationError(
            f"this tail would have about {estimate:,} parameters; the limit is {limit:,}",
            param="tail",
            code="tail_too_large",
        )


def resolve_default_taps(base: BaseModel | None) -> tuple[int, ...]:
    """The default ladder's taps for ``base`` (the bundled base's when its depth is unknown)."""
    layers = int((base.fingerprint if base else {}).get("num_layers") or 0)
    return default_taps(layers) if layers else CarryOnConfig().taps


_CARRY_ON_TYPES: dict[str, tuple[type, ...]] = {
    "d_model": (int,),
    "n_blocks": (int,),
    "n_heads": (int,),
    "mlp_ratio": (int, float),
    "alpha": (int, float),
    "dropout": (int, float),
    "tap_mode": (str,),
    "storage_dtype": (str,),
}


def _check_carry_on_types(values: Mapping[str, Any]) -> None:
    """JSON types first, so a wrong one is a 400 here rather than a failed job later."""
    for key, kinds in _CARRY_ON_TYPES.items():
        value = values.get(key)
        if key in values and (isinstance(value, bool) or not isinstance(value, kinds)):
            kind = (
                "a string" if kinds == (str,) else "an integer" if kinds == (int,) else "a number"
            )
            raise ApplicationError(f"{key} must be {kind}", param=f"carry_on.{key}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ApplicationError(f"{key} must be a finite number", param=f"carry_on.{key}")
    taps = values.get("taps", [])
    if taps == "auto":
        return
    if not isinstance(taps, list | tuple) or not all(
        isinstance(t, int) and not isinstance(t, bool) and abs(t) <= 4096 for t in taps
    ):
        raise ApplicationError(
            'taps must be "auto" or a list of layer indices', param="carry_on.taps"
        )


def _check_carry_on_size(options: Mapping[str, Any], base: BaseModel | None) -> None:
    """Refuse a carry-on too large for any worker (it would only run out of memory there)."""
    d, hidden = (
        int(options["d_model"]),
        int((base.fingerprint if base else {}).get("hidden_size", 0)),
    )
    blocks = int(options["n_blocks"]) * (4 + 3 * float(options["mlp_ratio"])) * d * d
    estimate = int(blocks + (len(options["taps"]) + 2) * hidden * d)
    # It must also fit the serving cache (float32), or it could never be served.
    limit = min(
        int(settings.CARRY_ON["MAX_CARRY_ON_PARAMETERS"]),
        int(settings.CARRY_ON["SERVING_ADAPTER_CACHE_BYTES"]) // 4,
    )
    if estimate > limit:
        raise ApplicationError(
            f"this carry-on would have about {estimate:,} parameters; the limit is {limit:,}",
            param="carry_on",
            code="carry_on_too_large",
        )


def _check_suffix(suffix: str | None) -> str:
    if suffix is None or suffix == "":
        return ""
    if not isinstance(suffix, str) or len(suffix) > 64 or not set(suffix) <= _SUFFIX_CHARS:
        raise ApplicationError(
            "suffix must be at most 64 letters, digits, '-', '_' or '.'", param="suffix"
        )
    return suffix


def _check_seed(seed: int | None) -> int:
    if seed is None:
        return secrets.randbelow(2**31)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ApplicationError("seed must be an integer in [0, 2147483647]", param="seed")
    return seed


def _check_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping) or len(metadata) > 16:
        raise ApplicationError("metadata must be an object of at most 16 pairs", param="metadata")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ApplicationError("metadata keys and values must be strings", param="metadata")
        if len(key) > 64 or len(value) > 512:
            raise ApplicationError(
                "metadata keys are at most 64 and values at most 512 characters", param="metadata"
            )
    return dict(metadata)


# -- the status machine -------------------------------------------------------------------------


def job_transition(
    *, job: FineTuningJob, to: str, only_worker: str | None = None, **fields: Any
) -> bool:
    """Move ``job`` to status ``to`` if it is still in the status it was read with.

    Raises ``ConflictError`` for a transition the machine does not allow; returns False when
    the job moved on meanwhile (or, with ``only_worker``, is held by another worker).
    """
    if to not in ALLOWED_TRANSITIONS[job.status]:
        raise ConflictError(
            f"a {job.status} job cannot become {to}", param="status", code="invalid_transition"
        )
    return status_update(job, to, only_worker=only_worker, **fields)


def job_cancel(*, job: FineTuningJob, user: User | None = None) -> FineTuningJob:
    """Cancel at any stage; a running task notices at its next heartbeat and stops."""
    for _ in range(3):  # the status may change under us (e.g. queued -> running)
        if job.status not in CANCELLABLE:
            raise ConflictError(
                f"job {job.id} is {job.status} and cannot be cancelled", code="invalid_transition"
            )
        if job_transition(job=job, to=Status.CANCELLED):
            who = f" by {user.username}" if user is not None else ""
            job_event_create(job=job, message=f"Job was cancelled{who}", level="warn")
            return job
        job.refresh_from_db()
    raise ConflictError(f"job {job.id} changed while cancelling; try again")


def job_retry(*, job: FineTuningJob) -> FineTuningJob:
    """Run a failed job again from file validation; training resumes from its checkpoints."""
    with transaction.atomic():
        moved = job_transition(
            job=job,
            to=Status.VALIDATING_FILES,
            stage="",
            error=None,
            progress=0.0,
            worker="",
            heartbeat_at=None,
            attempts=0,
            requeues=0,
            finished_at=None,
        )
        if not moved:
            raise ConflictError(f"job {job.id} changed meanwhile; try again")
        job_event_create(job=job, message="Job was retried")
        enqueue_stage(job_id=job.id, stage="validating")
    return job


def job_delete(*, job: FineTuningJob) -> None:
    """Delete a finished job with its events, checkpoints and their artifacts."""
    if not job.is_terminal:
        raise ConflictError(f"job {job.id} is {job.status}; cancel it first")
    folder = f"jobs/{job.id}"
    with transaction.atomic():
        job.delete()
        transaction.on_commit(lambda: remove_artifact(folder))


# -- events and enqueueing --------------------------------------------------------------------


def job_event_create(
    *,
    job: FineTuningJob,
    message: str,
    level: str = JobEvent.Level.INFO,
    type: str = JobEvent.Type.MESSAGE,
    data: Mapping[str, Any] | None = None,
) -> JobEvent:
    # Nanosecond clock as the order: unique enough per job, and needs no read-modify-write.
    return JobEvent.objects.create(
        job=job, message=message, level=level, type=type, data=dict(data or {}), seq=time.time_ns()
    )


STAGE_TASKS = {
    "validating": "validate_job_files",
    FineTuningJob.Stage.EXTRACTING: "extract_job_features",
    FineTuningJob.Stage.TRAINING: "train_job",
}


def send_stage(*, job_id: str, stage: str) -> None:
    """Send the stage's task now; ServiceUnavailableError (503) when the broker refuses it."""
    from kombu.exceptions import OperationalError as BrokerError

    from workers import tasks  # torch-free at import; routes pick the queue

    try:
        getattr(tasks, STAGE_TASKS[stage]).apply_async(args=[job_id])
    except (BrokerError, OSError) as exc:
        logger.warning("could not send %s of %s to the broker: %s", stage, job_id, exc)
        raise ServiceUnavailableError(
            "The job queue (message broker) is unreachable right now; nothing was created. "
            "Retry shortly.",
            code="broker_unavailable",
        ) from exc


def enqueue_stage(*, job_id: str, stage: str) -> None:
    """Send the stage's task once the current transaction commits (never a phantom job).

    A send the broker refuses leaves the job waiting with no message: the workers' sweep
    (pipeline.job_sweep_unclaimed) sends it again after REQUEUE_AFTER.
    """

    def send() -> None:
        with contextlib.suppress(ServiceUnavailableError):  # logged; the sweep sends it again
            send_stage(job_id=job_id, stage=stage)

    transaction.on_commit(send)


def job_model_name(job: FineTuningJob) -> str:
    """``ft:<base>:<owner>:<suffix>:<job id>``, the adapter's name."""
    owner = "".join(c if c.isalnum() or c in "-_." else "-" for c in job.owner.username)[:40]
    return f"ft:{job.base.name}:{owner}:{job.suffix}:{job.id}"
