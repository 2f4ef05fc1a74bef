"""Errors raised by the carry-on core.

Every error carries an OpenAI-style ``code`` and optionally the ``param`` it concerns, so
the web layer can render ``{"error": {"message", "type", "param", "code"}}`` without
knowing the core's internals.
"""

from __future__ import annotations

from dataclasses import dataclass


class CustomizationError(Exception):
    """Base class: a deterministic problem with the caller's input or artifacts."""

    code = "customization_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "param": self.param}


@dataclass(frozen=True)
class DatasetProblem:
    """One problem in an uploaded dataset, pinned to its 1-based line number."""

    line: int
    message: str
    snippet: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"line": self.line, "message": self.message, "snippet": self.snippet}


class DatasetFormatError(CustomizationError):
    """The dataset cannot be used; ``problems`` lists each issue with its line number."""

    code = "invalid_training_file"

    def __init__(
        self,
        problems: list[DatasetProblem],
        *,
        param: str | None = "training_file",
        max_shown: int = 5,
    ):
        if not problems:
            raise ValueError("DatasetFormatError needs at least one problem")
        self.problems = list(problems)
        shown = "; ".join(f"line {p.line}: {p.message}" for p in problems[:max_shown])
        more = len(problems) - max_shown
        suffix = f" (and {more} more)" if more > 0 else ""
        super().__init__(
            f"The dataset has {len(problems)} problem(s): {shown}{suffix}", param=param
        )

    @property
    def lines(self) -> list[int]:
        return [p.line for p in self.problems]


class IncompatibleBaseModelError(CustomizationError):
    """A carry-on or feature set was made for a different base model."""

    code = "incompatible_base_model"


class BaseModelNotFoundError(CustomizationError):
    """The base model source (HF id, folder, GGUF file, bundled wheel) cannot be found."""

    code = "base_model_not_found"


class ArtifactError(CustomizationError):
    """An artifact on disk is missing, corrupted (sha256 mismatch) or of an unknown format."""

    code = "artifact_error"


class ContextLengthError(CustomizationError):
    """A prompt does not fit the model's context window."""

    code = "context_length_exceeded"


class TrainingCancelled(CustomizationError):
    """Raised inside training when the cancel callback asks to stop."""

    code = "cancelled"


class TrainingDivergedError(CustomizationError):
    """The training loss became NaN or infinite: the run cannot recover from it."""

    code = "training_diverged"


class EngineOverloaded(CustomizationError):
    """The serving engine's queue is full; the caller should retry later."""

    code = "engine_overloaded"
