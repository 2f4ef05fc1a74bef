"""What the decoder keeps per request and counts per batch: plain records, no torch work.

Shared by ``decoder`` (the running batch), ``prefill`` (joining requests) and the
one-request helpers in ``generation``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from customization.carry_on import CarryOn
from customization.config import GenerationConfig
from customization.tail import TailAdapter

FinishReason = Literal["stop", "length"]
# What a request may run on top of the base: a carry-on, a tail, or nothing.
ServedAdapter = CarryOn | TailAdapter


@dataclass
class DecodeCounters:
    """Work done by a decoder, for tests and metrics (never timing)."""

    base_forwards: int = 0  # calls of the base backbone (prefills + decode steps - packed)
    decode_steps: int = 0  # batched decode steps
    decode_rows: int = 0  # sequence-steps served by those decode steps
    carry_on_forwards: int = 0  # rows a carry-on ran on, summed over forwards
    carry_on_batches: int = 0  # batched carry-on forwards in decode steps (one per shape group)
    prefill_tokens: int = 0  # prompt tokens prefilled (padding not counted)
    prefill_forwards: int = 0  # base forwards that prefill: one chunk of one or more prompts
    prefill_rows: int = 0  # prompt chunks summed over those forwards (a prompt in 3 chunks: 3)
    packed_forwards: int = 0  # base forwards that decoded rows and prefilled a chunk at once
    tail_delta_products: int = 0  # batched per-row LoRA products (one per layer and module)
    tail_rows: int = 0  # rows on a tail, summed over base forwards

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(eq=False)  # a sequence is itself: two identical requests are two sequences
class DecodeSequence:
    """One sequence being decoded."""

    prompt_ids: list[int]
    config: GenerationConfig
    carry_on: CarryOn | None
    stop_token_ids: tuple[int, ...]
    tail: TailAdapter | None = None
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    finish_reason: FinishReason | None = None
    text: str = ""  # text released so far (stop strings never released)
    max_new_tokens: int = 0
    tag: Any = None  # the caller's handle (e.g. a request id)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def position(self) -> int:
        """Position id of the next token fed to the model."""
        return len(self.prompt_ids) + len(self.generated) - 1


@dataclass
class StepOutput:
    sequence: DecodeSequence
    token_id: int | None
    text_delta: str
