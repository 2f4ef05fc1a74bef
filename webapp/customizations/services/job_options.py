"""A job's adapter options and hyperparameters, checked one by one so a 400 names the wrong one.

The options themselves (names, types, defaults, bounds) are declared in
``webapp.customizations.options``; this module applies them to a request: the preset and
kind it asks for, each option's type and range (through the core's config dataclasses),
the operator's caps, and what a continued fine-tune keeps from its parent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from django.conf import settings

from customization.config import ALL_LINEAR, FeatureConfig
from customization.presets import PRESETS, Preset, get_preset
from webapp.core.exceptions import ApplicationError
from webapp.customizations.models import Adapter, BaseModel, FineTuningJob
from webapp.customizations.options import (
    HYPERPARAMETER_RANGES,
    KindOptions,
    base_num_layers,
    carry_on_parameters,
    options_of,
    resolve_default_taps,
    tail_parameters,
)


def job_options(job: FineTuningJob) -> dict[str, Any]:
    """The adapter's options (shape, feature and training extras) of either kind."""
    options: dict[str, Any] = job.tail if job.kind == "tail" else job.carry_on
    return options


def job_adapter_options(
    *,
    parent: Adapter | None,
    base: BaseModel,
    preset: str | None,
    carry_on: Mapping[str, Any] | None,
    tail: Mapping[str, Any] | None,
) -> tuple[str, str, dict[str, Any]]:
    """A new job's preset name, adapter kind and checked options (``carry_on`` and ``tail``,
    one of them empty); a continued fine-tune's follow its ``parent``."""
    if parent is not None:
        return _continued_options(parent, base=base, preset=preset, carry_on=carry_on, tail=tail)
    chosen = _resolve_preset(preset)
    kind = _job_kind(chosen, carry_on=carry_on, tail=tail)
    if kind == "tail":
        shape = {"tail": _check_tail(tail or {}, base=base, preset=chosen), "carry_on": {}}
    else:
        shape = {"carry_on": _check_carry_on(carry_on or {}, base=base, preset=chosen), "tail": {}}
    return (chosen.name if chosen else ""), kind, shape


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
    registry = options_of(kind)
    _check_known(given, registry.defaults, kind)
    keys = registry.shape_keys
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
        return list(ALL_LINEAR)
    return list(value) if isinstance(value, tuple) else value


def check_hyperparameters(values: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI's hyperparameters, each "auto" or a number in its range."""
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
    registry = options_of("carry_on")
    _check_known(values, registry.defaults, "carry_on")
    _check_types(values, registry)
    _check_taps(values)
    options = {**registry.defaults, **(preset.options if preset else {}), **values}
    if options["taps"] == "auto":
        options["taps"] = list(resolve_default_taps(base))
    try:
        shape = {key: options[key] for key in registry.shape_keys}
        shape["taps"] = tuple(shape["taps"])
        registry.config(**shape)
        FeatureConfig(
            taps=shape["taps"],
            max_length=512 if options["max_length"] == "auto" else options["max_length"],
            storage_dtype=options["storage_dtype"],
        )
    except (TypeError, ValueError) as exc:
        raise ApplicationError(f"invalid carry_on options: {exc}", param="carry_on") from None
    _check_extras(options, "carry_on")
    options["taps"] = list(shape["taps"])
    _check_adapter_size("carry_on", carry_on_parameters(options, base))
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
    options module's EXTRAS), with the operator's caps; ``kind`` names the param."""
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
    """Tail options checked one by one with the tail's config, so a 400 names one."""
    registry = options_of("tail")
    _check_known(values, registry.defaults, "tail")
    options = {**registry.defaults, **(preset.options if preset else {}), **values}
    layers = base_num_layers(base)
    if "depth" not in values and layers:
        # A preset's or the default depth fits any base ("best": every layer); a depth the
        # user gave is checked against the base instead.
        options["depth"] = min(int(options["depth"]), layers)
    if options["target_modules"] == "all-linear":  # PEFT's spelling
        options["target_modules"] = list(ALL_LINEAR)
    _check_types(options, registry)
    _check_target_modules(options)
    for key in registry.shape_keys:
        value = options[key]
        given: dict[str, Any] = {key: tuple(value) if key == "target_modules" else value}
        if key == "depth":
            given["num_layers"] = layers
        try:
            registry.config(**given)
        except ValueError as exc:
            raise ApplicationError(f"invalid tail option: {exc}", param=f"tail.{key}") from None
    options["target_modules"] = list(options["target_modules"])
    _check_extras(options, "tail")
    _check_adapter_size("tail", tail_parameters(options, base))
    return options


def _check_types(values: Mapping[str, Any], registry: KindOptions) -> None:
    """JSON types first, so a wrong one is a 400 here rather than a failed job later."""
    for key, option in registry.typed.items():
        if key not in values:
            continue
        value = values[key]
        if (isinstance(value, bool) and bool not in option.types) or not isinstance(
            value, option.types
        ):
            raise ApplicationError(
                f"{key} must be {option.type_name}", param=f"{registry.kind}.{key}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ApplicationError(f"{key} must be a finite number", param=f"{registry.kind}.{key}")


def _check_target_modules(options: Mapping[str, Any]) -> None:
    modules = options["target_modules"]
    if not isinstance(modules, list | tuple) or not all(isinstance(m, str) for m in modules):
        raise ApplicationError(
            'target_modules must be "all-linear" or a list of module names',
            param="tail.target_modules",
        )


def _check_taps(values: Mapping[str, Any]) -> None:
    taps = values.get("taps", [])
    if taps == "auto":
        return
    if not isinstance(taps, list | tuple) or not all(
        isinstance(t, int) and not isinstance(t, bool) and abs(t) <= 4096 for t in taps
    ):
        raise ApplicationError(
            'taps must be "auto" or a list of layer indices', param="carry_on.taps"
        )


def _check_adapter_size(kind: str, estimate: int) -> None:
    """Refuse an adapter (``kind``: "carry_on" or "tail") of about ``estimate`` parameters
    that is too large for any worker (it would only run out of memory there)."""
    # It must also fit the serving cache (float32), or it could never be served.
    limit = min(
        int(settings.CARRY_ON["MAX_CARRY_ON_PARAMETERS"]),
        int(settings.CARRY_ON["SERVING_ADAPTER_CACHE_BYTES"]) // 4,
    )
    if estimate > limit:
        raise ApplicationError(
            f"this {kind.replace('_', '-')} would have about {estimate:,} parameters; "
            f"the limit is {limit:,}",
            param=kind,
            code=f"{kind}_too_large",
        )
