"""Configuration dataclasses for the carry-on core.

Each config validates itself in ``__post_init__`` (a ``ValueError`` naming the valid range),
round-trips through ``to_dict``/``from_dict`` and carries a ``format_version``. Keys written
by a newer version that this one does not know are dropped with a warning, as PEFT does, so
an older server can still read a newer artifact's config where the shape allows it.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Self, TypeVar

FORMAT_VERSION = 1
# The longest stop string a request may give (OpenAI allows 4 of them): releasing text checks
# each one against the tail of the output at every step.
MAX_STOP_CHARS = 1000

TapMode = Literal["ladder", "mix"]
StorageDtype = Literal["float32", "float16", "int8"]

T = TypeVar("T", bound="_Config")


def default_taps(num_layers: int) -> tuple[int, ...]:
    """The default ladder's taps for a base of ``num_layers`` layers.

    The final state, then up to seven intermediate layers spread evenly over the depth and
    kept three below the top (docs/carry_on_quality.md: the ladder learned best in the
    sweep). For the bundled 30-layer SmolLM2 that is (-1, 4, 8, 12, 16, 20, 24, 27).
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    top = max(1, num_layers - 3)
    spread = (min(max(1, round(num_layers * k / 7.5)), top) for k in range(1, 8))
    intermediate = sorted({layer for layer in spread if layer < num_layers})
    return (-1, *intermediate)


# The dataclass default names the bundled base's layers; code that knows its base's depth
# (the CLI, the web app) asks default_taps(num_layers) instead.
BUNDLED_BASE_LAYERS = 30
DEFAULT_TAPS: tuple[int, ...] = default_taps(BUNDLED_BASE_LAYERS)


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not (low <= value <= high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")


class _Config:
    """Shared to_dict/from_dict for the dataclasses below."""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {key: (list(v) if isinstance(v, tuple) else v) for key, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"{cls.__name__}: ignoring unknown keys {unknown} (written by a newer version?)",
                stacklevel=2,
            )
        kwargs = {key: value for key, value in data.items() if key in known}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in kwargs and isinstance(kwargs[f.name], list):
                kwargs[f.name] = tuple(
                    tuple(x) if isinstance(x, list) else x for x in kwargs[f.name]
                )
        return cls(**kwargs)


@dataclass(frozen=True)
class CarryOnConfig(_Config):
    """The shape of one carry-on (docs/architecture.md, "The carry-on").

    ``taps`` are hidden-state indices of the base (``hidden_states[i]`` in HF terms:
    0 is the embedding output, ``num_layers`` the final, normed state; negative values count
    from the end, so -1 is the final layer). ``tap_sizes`` holds each tap's width D_i; it is
    filled from the base when the carry-on is built. With several bases, ``tap_bases`` gives
    each tap's base index (0 = the primary base whose LM head produces the logits).

    ``tap_mode``: "mix" sums the projected taps at the input with learned softmax weights;
    "ladder" starts the stream from tap 0 and adds the other taps to the residual stream
    before the blocks, in order (Ladder Side-Tuning style): one tap per block while there
    are at most ``n_blocks`` of them, else contiguous groups, earlier taps to earlier
    blocks (``ladder_blocks``).
    """

    d_model: int = 128
    n_blocks: int = 2
    n_heads: int = 4
    mlp_ratio: float = 4.0
    taps: tuple[int, ...] = DEFAULT_TAPS
    tap_bases: tuple[int, ...] = ()
    tap_sizes: tuple[int, ...] = ()
    tap_mode: TapMode = "ladder"
    hidden_size: int = 0  # D of the primary base (the merge width); filled from the base
    alpha: float = 1.0
    gate_bias_init: float = 0.0
    dropout: float = 0.0
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    norm_eps: float = 1e-5
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _check_range("d_model", self.d_model, 8, 8192)
        _check_range("n_blocks", self.n_blocks, 1, 64)
        _check_range("n_heads", self.n_heads, 1, 128)
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) "
                "into an even head size"
            )
        _check_range("mlp_ratio", self.mlp_ratio, 0.5, 16)
        if not self.taps:
            raise ValueError("taps must name at least one hidden-state index")
        if self.tap_sizes and len(self.tap_sizes) != len(self.taps):
            raise ValueError("tap_sizes must give one width per tap")
        if self.tap_bases and len(self.tap_bases) != len(self.taps):
            raise ValueError("tap_bases must give one base index per tap")
        if len(set(zip(self.resolved_tap_bases, self.taps, strict=True))) != len(self.taps):
            raise ValueError(f"taps must not repeat, got {list(self.taps)}")
        if self.tap_mode not in ("ladder", "mix"):
            raise ValueError(f"tap_mode must be 'ladder' or 'mix', got {self.tap_mode!r}")
        _check_range("number of taps", len(self.taps), 1, 256)
        _check_range("alpha", self.alpha, 0.0, 100.0)
        _check_range("dropout", self.dropout, 0.0, 0.9)
        _check_range("gate_bias_init", self.gate_bias_init, -20.0, 20.0)
        if self.format_version > FORMAT_VERSION:
            warnings.warn(
                f"carry-on config format {self.format_version} is newer than {FORMAT_VERSION}",
                stacklevel=2,
            )

    @property
    def resolved_tap_bases(self) -> tuple[int, ...]:
        return self.tap_bases or tuple(0 for _ in self.taps)

    @property
    def ladder_blocks(self) -> tuple[int, ...]:
        """The block each ladder tap (``taps[1:]``) is added before.

        Up to ``n_blocks`` taps: tap j + 1 enters block j (the original ladder, so older
        artifacts keep their meaning). More taps: contiguous groups of nearly equal size.
        """
        rungs = len(self.taps) - 1
        if rungs <= self.n_blocks:
            return tuple(range(rungs))
        return tuple(index * self.n_blocks // rungs for index in range(rungs))

    @property
    def n_bases(self) -> int:
        return max(self.resolved_tap_bases) + 1

    def resolved(self, *, tap_sizes: tuple[int, ...], hidden_size: int) -> CarryOnConfig:
        """This config with the base-dependent sizes filled in."""
        return dataclasses.replace(self, tap_sizes=tap_sizes, hidden_size=hidden_size)


ALL_LINEAR: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
# The tail's peak learning rate (bench/results/sweep.md: LoRA on the top layers learned best
# at 2e-3); a carry-on keeps TrainingConfig's 3e-3.
TAIL_LEARNING_RATE = 2e-3


@dataclass(frozen=True)
class TailConfig(_Config):
    """The shape of one tail: LoRA on the base's top ``depth`` decoder layers.

    See docs/architecture.md, "The tail".

    The tail reads the cached state ``hidden_states[num_layers - depth]`` and re-runs the
    base's own top ``depth`` layers with a LoRA delta ``B·A·(alpha / rank)`` on each of
    ``target_modules``, then the final norm and the frozen LM head. ``depth = num_layers``
    is LoRA on every layer. ``num_layers`` is the base's depth, filled when it is built.
    """

    depth: int = 8
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ALL_LINEAR
    dropout: float = 0.0
    num_layers: int = 0
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _check_range("depth", self.depth, 1, 1024)
        _check_range("rank", self.rank, 1, 256)
        _check_range("alpha", self.alpha, 1e-3, 4096.0)
        _check_range("dropout", self.dropout, 0.0, 0.9)
        if not self.target_modules:
            raise ValueError("target_modules must name at least one linear layer")
        unknown = sorted(set(self.target_modules) - set(ALL_LINEAR))
        if unknown:
            raise ValueError(
                f"target_modules: unknown module {unknown[0]!r}; known: {', '.join(ALL_LINEAR)}"
            )
        if len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError("target_modules must not repeat")
        if self.num_layers and self.depth > self.num_layers:
            raise ValueError(
                f"depth must be in [1, {self.num_layers}] for a {self.num_layers}-layer base, "
                f"got {self.depth}"
            )

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def first_layer(self) -> int:
        """The index of the first tail layer, which is also the cached state it reads."""
        if not self.num_layers:
            raise ValueError("the tail config is not resolved: num_layers is unknown")
        return self.num_layers - self.depth

    @property
    def layers(self) -> tuple[int, ...]:
        """The base layers the tail re-runs (PEFT's ``layers_to_transform``)."""
        return tuple(range(self.first_layer, self.num_layers))

    def resolved(self, *, num_layers: int) -> TailConfig:
        return dataclasses.replace(self, num_layers=num_layers)


@dataclass(frozen=True)
class FeatureConfig(_Config):
    """How hidden states are extracted and stored (part of the feature-cache key)."""

    taps: tuple[int, ...] = DEFAULT_TAPS
    max_length: int = 512
    storage_dtype: StorageDtype = "float16"
    batch_size: int = 8
    shard_examples: int = 256
    # A carry-on merges into the base's final state; a tail recomputes it, so a tail's
    # features skip it (one state instead of two).
    include_final: bool = True
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not self.taps:
            raise ValueError("taps must name at least one hidden-state index")
        _check_range("max_length", self.max_length, 8, 131072)
        if self.storage_dtype not in ("float32", "float16", "int8"):
            raise ValueError(
                f"storage_dtype must be float32, float16 or int8, got {self.storage_dtype!r}"
            )
        _check_range("batch_size", self.batch_size, 1, 1024)
        _check_range("shard_examples", self.shard_examples, 1, 1_000_000)


@dataclass(frozen=True)
class TrainingConfig(_Config):
    """Optimisation settings for one training run."""

    epochs: int = 3
    batch_size: int = 8
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0 = only at epoch ends
    early_stopping_patience: int = 0  # epochs without validation improvement; 0 = off
    loss_chunk_tokens: int = 1024  # LM-head chunk size: bounds memory for large vocabularies
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _check_range("epochs", self.epochs, 1, 1000)
        _check_range("batch_size", self.batch_size, 1, 4096)
        _check_range("learning_rate", self.learning_rate, 1e-7, 1.0)
        _check_range("weight_decay", self.weight_decay, 0.0, 1.0)
        _check_range("warmup_fraction", self.warmup_fraction, 0.0, 0.5)
        _check_range("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _check_range("grad_clip", self.grad_clip, 0.0, 1e6)
        _check_range("checkpoint_every", self.checkpoint_every, 0, 10**9)
        _check_range("early_stopping_patience", self.early_stopping_patience, 0, 1000)
        _check_range("loss_chunk_tokens", self.loss_chunk_tokens, 16, 1 << 20)


@dataclass(frozen=True)
class GenerationConfig(_Config):
    """Sampling settings for one request (OpenAI's names where they exist)."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    # OpenAI's penalties: logit -= frequency_penalty * count + presence_penalty * (count > 0),
    # counted over the generated tokens.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _check_range("max_new_tokens", self.max_new_tokens, 1, 1_000_000)
        _check_range("temperature", self.temperature, 0.0, 2.0)
        _check_range("top_p", self.top_p, 0.0, 1.0)
        if self.top_p == 0.0:
            raise ValueError("top_p must be in (0, 1], got 0")
        _check_range("top_k", self.top_k, 0, 1_000_000)
        _check_range("repetition_penalty", self.repetition_penalty, 0.01, 10.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        if len(self.stop) > 4:
            raise ValueError(f"stop takes at most 4 strings, got {len(self.stop)}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            longest = max(len(s) for s in self.stop)
            raise ValueError(
                f"a stop string may be at most {MAX_STOP_CHARS} characters, got {longest}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
