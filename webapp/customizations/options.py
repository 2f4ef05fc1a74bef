"""A fine-tuning job's options, declared once from the core's config dataclasses.

Each adapter kind's options are the user-facing fields of its config (``CarryOnConfig``,
``TailConfig``) plus the extraction and training extras both kinds take. A field is an
option when ``_FIELDS`` below describes it or when the dataclass field itself carries
``metadata={"option": {...}}`` with the same keys (``help``, ``low``, ``high``, ``form``);
its default and JSON type come from the dataclass. The API schema, the job form, the
service's checks and the estimate all read these tables, so a new field is offered and
accepted everywhere at once.

The parameter counts both the size checks and the estimate use live here too
(``carry_on_parameters``, ``tail_parameters``, ``base_linear_shapes``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from customization.config import (
    CarryOnConfig,
    FeatureConfig,
    TailConfig,
    TrainingConfig,
    default_taps,
)
from customization.presets import base_learning_rate

if TYPE_CHECKING:
    from webapp.customizations.models import BaseModel


@dataclass(frozen=True)
class Option:
    """One option a job takes: its JSON types, default, bounds and help text."""

    name: str
    types: tuple[type, ...]
    default: Any
    help: str = ""
    low: float | None = None
    high: float | None = None
    # Part of the adapter's shape (a continued fine-tune keeps it), else an extra.
    shape: bool = True
    # Offered on the job form: True, or the form field's own arguments (a narrower range).
    form: bool | Mapping[str, Any] = False
    # Type-checked one by one; False where the value may be "auto" or has its own check.
    typed: bool = True

    @property
    def type_name(self) -> str:
        """How a 400 names the expected type: "a string", "an integer" or "a number"."""
        if self.types == (str,):
            return "a string"
        return "an integer" if self.types == (int,) else "a number"


@dataclass(frozen=True)
class KindOptions:
    """One adapter kind's options and the config dataclass that validates its shape."""

    kind: str
    config: type[Any]
    options: dict[str, Option]

    @property
    def defaults(self) -> dict[str, Any]:
        return {name: option.default for name, option in self.options.items()}

    @property
    def shape_keys(self) -> tuple[str, ...]:
        return tuple(name for name, option in self.options.items() if option.shape)

    @property
    def typed(self) -> dict[str, Option]:
        """Options with a scalar JSON type (lists such as taps are checked on their own)."""
        return {n: o for n, o in self.options.items() if o.typed and list not in o.types}


# What the dataclasses do not say about their user-facing fields: help text, bounds for the
# schema and the form, and whether the form offers them. Bounds are the config's own ranges.
_FIELDS: dict[type[Any], dict[str, dict[str, Any]]] = {
    CarryOnConfig: {
        "d_model": {"help": "Width of the carry-on's blocks", "low": 8, "high": 8192},
        "n_blocks": {
            "help": "Number of carry-on blocks",
            "low": 1,
            "high": 64,
            "form": {"max_value": 16},
        },
        "n_heads": {"help": "Attention heads (d_model / n_heads even)", "low": 1, "high": 128},
        "mlp_ratio": {"help": "MLP width as a multiple of d_model", "low": 0.5, "high": 16},
        "taps": {"help": '"auto" (the default ladder for the base) or layer indices'},
        "tap_mode": {"help": "ladder or mix: how the taps enter the blocks"},
        "alpha": {"help": "Scale of the carry-on's output", "low": 0.0, "high": 100.0},
        "dropout": {"help": "Dropout in the blocks", "low": 0.0, "high": 0.9},
    },
    TailConfig: {
        "depth": {
            "help": "How many of the base's top layers the tail re-runs (1..L)",
            "low": 1,
            "high": 1024,
        },
        "rank": {"help": "LoRA rank, 1..256", "low": 1, "high": 256},
        "alpha": {"help": "LoRA alpha (scale alpha / rank)", "low": 1e-3, "high": 4096.0},
        "target_modules": {"help": '"all-linear" or names among q_proj ... down_proj'},
        "dropout": {"help": "LoRA dropout", "low": 0.0, "high": 0.9},
    },
}
# Offered on the job form (in this order): the rest are API-only.
_FORM = {CarryOnConfig: ("d_model", "n_blocks", "taps", "tap_mode"), TailConfig: ("depth", "rank")}


def _json_types(default: Any) -> tuple[type, ...]:
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, int):
        return (int,)
    if isinstance(default, float):
        return (int, float)
    if isinstance(default, str):
        return (str,)
    return (list,)


def config_options(config: type[Any]) -> dict[str, Option]:
    """The user-facing fields of a config dataclass as options, in field order."""
    described = _FIELDS.get(next((c for c in config.__mro__ if c in _FIELDS), config), {})
    form = _FORM.get(next((c for c in config.__mro__ if c in _FORM), config), ())
    options: dict[str, Option] = {}
    for f in dataclasses.fields(config):
        meta = {**described.get(f.name, {}), **f.metadata.get("option", {})}
        if f.name not in described and "option" not in f.metadata:
            continue
        default: Any = f.default
        if f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        if f.name == "taps":
            default = "auto"  # the default ladder for the job's base
        if isinstance(default, tuple):
            default = list(default)
        options[f.name] = Option(
            name=f.name,
            types=_json_types(default) if f.name != "taps" else (list,),
            default=default,
            help=meta.get("help", ""),
            low=meta.get("low"),
            high=meta.get("high"),
            form=meta.get("form", f.name in form or "option" in f.metadata),
        )
    return options


_FEATURES, _TRAINING = FeatureConfig(), TrainingConfig()
# Extraction (part of the feature-cache key) and training extras, the same for both kinds.
EXTRAS: dict[str, Option] = {
    "max_length": Option(
        "max_length",
        (int,),
        "auto",
        '"auto" or the most tokens an example keeps',
        shape=False,
        typed=False,
    ),
    "storage_dtype": Option(
        "storage_dtype", (str,), _FEATURES.storage_dtype, "float32, float16 or int8", shape=False
    ),
    "checkpoint_every": Option(
        "checkpoint_every",
        (int,),
        "auto",
        '"auto" (epoch ends) or steps',
        shape=False,
        typed=False,
    ),
    "early_stopping_patience": Option(
        "early_stopping_patience",
        (int,),
        _TRAINING.early_stopping_patience,
        "Epochs without validation improvement before stopping; 0: off",
        low=0,
        high=100,
        shape=False,
        typed=False,
    ),
}


def kind_options(kind: str, config: type[Any]) -> KindOptions:
    """A kind's options: its config's user-facing fields, then the extras."""
    return KindOptions(kind=kind, config=config, options={**config_options(config), **EXTRAS})


CARRY_ON = kind_options("carry_on", CarryOnConfig)
TAIL = kind_options("tail", TailConfig)


def options_of(kind: str) -> KindOptions:
    """The options of ``kind`` ("carry_on" or "tail"), read when called (tests swap them)."""
    return TAIL if kind == "tail" else CARRY_ON


# -- hyperparameters (OpenAI's names) ----------------------------------------------------------

# The carry-on's peak learning rate at learning_rate_multiplier = 1.
BASE_LEARNING_RATE = base_learning_rate("carry_on")
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


def hyperparameter_help(name: str) -> str:
    """``"auto" (default N) or low..high``, from the tables above."""
    _, low, high = HYPERPARAMETER_RANGES[name]
    return f'"auto" (default {AUTO_HYPERPARAMETERS[name]:g}) or {low:g}..{high:g}'


# -- what a shape costs ------------------------------------------------------------------------


def base_num_layers(base: BaseModel | None) -> int:
    """The base's decoder layers (its fingerprint's ``num_layers``); 0 when unknown."""
    layers = (base.fingerprint if base else {}).get("num_layers")
    return layers if isinstance(layers, int) and not isinstance(layers, bool) else 0


def resolve_default_taps(base: BaseModel | None) -> tuple[int, ...]:
    """The default ladder's taps for ``base`` (the bundled base's when its depth is unknown)."""
    layers = int((base.fingerprint if base else {}).get("num_layers") or 0)
    return default_taps(layers) if layers else CarryOnConfig().taps


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


def carry_on_parameters(options: Mapping[str, Any], base: BaseModel | None) -> int:
    """About a carry-on's parameters: its blocks, plus each tap's projection in and one out."""
    d, hidden = (
        int(options["d_model"]),
        int((base.fingerprint if base else {}).get("hidden_size", 0)),
    )
    blocks = int(options["n_blocks"]) * (4 + 3 * float(options["mlp_ratio"])) * d * d
    return int(blocks + (len(options["taps"]) + 2) * hidden * d)
