"""One request at a time on top of the batch decoder, and uncached references for tests.

``generate``/``stream`` serve a single request (``generate_batch`` several at once) through
``BatchDecoder``, the path the serving engine takes; ``prompt_logits`` is that path's
prefill at every position (evaluation); ``greedy_reference`` recomputes every step from
scratch with no cache at all, the yardstick the cached, batched paths are tested against.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from customization.base_model import FrozenBase
from customization.carry_on import CarryOn
from customization.config import GenerationConfig
from customization.decode_state import DecodeCounters, FinishReason, ServedAdapter, StepOutput
from customization.decoder import BatchDecoder
from customization.tail import TailModel


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def stream(
    base: FrozenBase,
    prompt_ids: Sequence[int],
    config: GenerationConfig,
    adapter: ServedAdapter | None = None,
) -> Iterator[StepOutput]:
    """Yield one ``StepOutput`` per generated token (the last one has finish_reason set)."""
    decoder = BatchDecoder(base)
    sequence = decoder.new_sequence(prompt_ids, config, adapter)
    decoder.add(sequence)
    while not sequence.finished:
        yield from decoder.step()


def generate(
    base: FrozenBase,
    prompt_ids: Sequence[int],
    config: GenerationConfig,
    adapter: ServedAdapter | None = None,
) -> GenerationResult:
    """The whole reply to one request."""
    outputs = list(stream(base, prompt_ids, config, adapter))
    sequence = outputs[-1].sequence
    assert sequence.finish_reason is not None
    return GenerationResult(
        text=sequence.text,
        token_ids=list(sequence.generated),
        finish_reason=sequence.finish_reason,
        prompt_tokens=len(sequence.prompt_ids),
    )


def generate_batch(
    base: FrozenBase,
    requests: Sequence[tuple[Sequence[int], GenerationConfig, ServedAdapter | None]],
) -> tuple[list[GenerationResult], DecodeCounters]:
    """Decode several requests together (one shared base forward per step)."""
    decoder = BatchDecoder(base)
    sequences = [decoder.new_sequence(p, c, k) for p, c, k in requests]
    for sequence in sequences:
        decoder.add(sequence)
    while decoder.active:
        decoder.step()
    results = [
        GenerationResult(s.text, list(s.generated), s.finish_reason or "stop", len(s.prompt_ids))
        for s in sequences
    ]
    return results, decoder.counters


@torch.inference_mode()
def prompt_logits(
    base: FrozenBase, prompt_ids: Sequence[int], adapter: ServedAdapter | None = None
) -> torch.Tensor:
    """Logits (T, V) at every prompt position through the serving path (a prefill)."""
    decoder = BatchDecoder(base)
    sequence = decoder.new_sequence(prompt_ids, GenerationConfig(max_new_tokens=1), adapter)
    ids = torch.tensor([sequence.prompt_ids], device=base.device)
    positions = torch.arange(ids.shape[1], device=base.device).unsqueeze(0)
    hidden = decoder._backbone(
        [sequence], input_ids=ids, position_ids=positions, output_hidden_states=True
    ).hidden_states
    final = hidden[-1]
    if sequence.carry_on is not None:
        taps = [hidden[base.resolve_tap(t)] for t in sequence.carry_on.config.taps]
        final = sequence.carry_on(taps, final, positions)
    return base.logits(final[0]).float()


@torch.inference_mode()
def greedy_reference(
    base: FrozenBase,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    carry_on: CarryOn | TailModel | None,
) -> list[int]:
    """Greedy decoding recomputed from scratch at every step, no caches (for tests).

    A tail is given as the training-side ``TailModel``, so this also checks that the
    engine's per-row LoRA computes what training computed.
    """
    ids = list(prompt_ids)
    generated: list[int] = []
    stops = base.tokenizer.stop_token_ids
    for _ in range(max_new_tokens):
        batch = torch.tensor([ids], device=base.device)
        hidden = base.backbone(input_ids=batch, output_hidden_states=True).hidden_states
        final = hidden[-1]
        if isinstance(carry_on, TailModel):
            positions = torch.arange(len(ids), device=base.device).unsqueeze(0)
            final = carry_on(hidden[carry_on.config.first_layer], positions)
        elif carry_on is not None:
            taps = [hidden[base.resolve_tap(t)] for t in carry_on.config.taps]
            final = carry_on(taps, final)
        token = int(base.logits(final[0, -1]).argmax())
        if token in stops:
            break
        generated.append(token)
        ids.append(token)
    return generated
