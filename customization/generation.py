"""Generation with the frozen base plus (optionally) a carry-on, both with KV caches.

The base forward does not depend on the carry-on, so a batch of sequences that use
*different* carry-ons (or none) shares one base forward per decode step; each carry-on then
runs only on its own rows, and the frozen LM head runs once over the merged states. This is
the structural advantage over LoRA serving, where an adapter touches every layer.

``BatchDecoder`` holds the running batch: ``add`` prefills a new sequence on its own and
merges its cache into the batch (left-padding the shorter side), ``step`` advances every
sequence by one token with one base forward, finished sequences leave the batch at once.
``generate``/``stream`` are the one-request conveniences on top of it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from customization import batched_lora
from customization.base_model import FrozenBase
from customization.carry_on import CarryOn, CarryOnCache
from customization.config import GenerationConfig
from customization.errors import ContextLengthError, CustomizationError
from customization.tail import TailAdapter, TailModel

FinishReason = Literal["stop", "length"]
# What a request may run on top of the base: a carry-on, a tail, or nothing.
ServedAdapter = CarryOn | TailAdapter


@dataclass
class DecodeCounters:
    """Work done by a decoder, for tests and metrics (never timing)."""

    base_forwards: int = 0  # calls of the base backbone (prefills + decode steps)
    decode_steps: int = 0  # batched decode steps
    decode_rows: int = 0  # sequence-steps served by those decode steps
    carry_on_forwards: int = 0
    prefill_tokens: int = 0
    tail_delta_products: int = 0  # batched per-row LoRA products (one per layer and module)
    tail_rows: int = 0  # rows on a tail, summed over base forwards

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class DecodeSequence:
    """One sequence being decoded."""

    prompt_ids: list[int]
    config: GenerationConfig
    carry_on: CarryOn | None
    stop_token_ids: tuple[int, ...]
    tail: TailAdapter | None = None
    generated: list[int] = field(default_factory=list)
    carry_on_cache: CarryOnCache | None = None
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


def _merged_logits(
    base: FrozenBase,
    hidden_states: Sequence[torch.Tensor],
    rows: Sequence[DecodeSequence],
    positions: torch.Tensor,
    counters: DecodeCounters,
) -> torch.Tensor:
    """Apply each row's carry-on to its rows of the last position, then the LM head once.

    ``hidden_states`` are the base's states (B, T, D) for the rows; only the last position's
    merged state is needed for sampling, but the carry-on consumes every new position to
    fill its own cache.
    """
    final = hidden_states[-1]  # (B, T, D)
    merged_last = final[:, -1, :].clone()  # (B, D)
    for row, sequence in enumerate(rows):
        carry_on = sequence.carry_on
        if carry_on is None:
            continue
        taps = [
            hidden_states[base.resolve_tap(t)][row : row + 1] for t in carry_on.config.taps
        ]  # each (1, T, D)
        if sequence.carry_on_cache is None:
            sequence.carry_on_cache = CarryOnCache()
        merged = carry_on(
            taps,
            final[row : row + 1],
            positions[row : row + 1],
            sequence.carry_on_cache,
        )  # (1, T, D)
        merged_last[row] = merged[0, -1]
        counters.carry_on_forwards += 1
    return base.logits(merged_last).float()  # (B, V)


def _apply_repetition_penalty(logits: torch.Tensor, seen: list[int], penalty: float) -> None:
    if penalty == 1.0 or not seen:
        return
    index = torch.tensor(sorted(set(seen)), device=logits.device)
    values = logits[index]
    logits[index] = torch.where(values > 0, values / penalty, values * penalty)


def _apply_openai_penalties(
    logits: torch.Tensor, generated: list[int], config: GenerationConfig
) -> None:
    if not generated or (config.frequency_penalty == 0.0 and config.presence_penalty == 0.0):
        return
    tokens, counts = torch.tensor(generated, device=logits.device).unique(return_counts=True)
    logits[tokens] -= config.frequency_penalty * counts.to(logits.dtype) + config.presence_penalty


def sample_token(logits: torch.Tensor, sequence: DecodeSequence) -> int:
    """Pick the next token for one sequence from its logits (V,)."""
    config = sequence.config
    logits = logits.clone()
    _apply_repetition_penalty(
        logits, sequence.prompt_ids + sequence.generated, config.repetition_penalty
    )
    _apply_openai_penalties(logits, sequence.generated, config)
    if config.greedy:
        return int(logits.argmax())
    logits = logits / config.temperature
    if config.top_k:
        kth = torch.topk(logits, min(config.top_k, logits.shape[-1])).values[-1]
        logits[logits < kth] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    if config.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        keep = sorted_probs.cumsum(-1) - sorted_probs < config.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    # The generator lives on the CPU (seeds then reproduce on any device): sample there.
    return int(torch.multinomial(probs.cpu(), 1, generator=sequence.generator))


def _stop_prefix_at_end(text: str, stop: str) -> int:
    """Length of the longest proper prefix of ``stop`` that ``text`` ends with.

    Only the last ``len(stop) - 1`` characters can take part, and a match must begin with
    ``stop[0]``: the scan jumps between those with ``str.find`` and stops at the first
    (longest) match, so a step costs about ``len(stop)`` character operations, never the
    ``len(stop) ** 2`` of trying every prefix length.
    """
    tail = text[max(0, len(text) - len(stop) + 1) :] if len(stop) > 1 else ""
    start = tail.find(stop[0])
    while start >= 0:
        if stop.startswith(tail[start:]):
            return len(tail) - start
        start = tail.find(stop[0], start + 1)
    return 0


class _TextReleaser:
    """Incremental detokenization that never releases a (partial) stop string."""

    @staticmethod
    def update(base: FrozenBase, sequence: DecodeSequence) -> str:
        text = base.tokenizer.decode(sequence.generated)
        stops = sequence.config.stop
        # Released text holds back any suffix that could grow into a stop string, so a new
        # occurrence starts in the unreleased part: search from there, not from the start.
        longest = max((len(s) for s in stops), default=0)
        origin = max(0, len(sequence.text) - longest)
        stop_at = min(
            (index for s in stops if (index := text.find(s, origin)) >= 0),
            default=-1,
        )
        if stop_at >= 0:
            sequence.finish_reason = "stop"
            text = text[:stop_at]
        elif not sequence.finished:
            # Hold back an incomplete UTF-8 character and any suffix that could still
            # grow into a stop string.
            text = text.rstrip("\ufffd")
            hold = max((_stop_prefix_at_end(text, s) for s in stops), default=0)
            text = text[: len(text) - hold]
        if not text.startswith(sequence.text):
            # Rare: detokenization changed an earlier character; release nothing new.
            return ""
        delta = text[len(sequence.text) :]
        sequence.text = text
        return delta


class BatchDecoder:
    """A running batch of sequences on one base, sharing the base forward per step."""

    def __init__(self, base: FrozenBase, *, counters: DecodeCounters | None = None):
        from transformers import DynamicCache

        self.base = base
        self.counters = counters if counters is not None else DecodeCounters()
        self.sequences: list[DecodeSequence] = []
        self._cache_class = DynamicCache
        self._cache: Any = None
        self._attention: torch.Tensor | None = None  # (B, L) 1 = real slot, 0 = left pad
        # Set once the base serves a tail: its linears then add per-row LoRA deltas.
        self._tails: batched_lora.RowTails | None = getattr(base.model, "_carry_on_row_tails", None)

    @property
    def active(self) -> int:
        return len(self.sequences)

    def new_sequence(
        self,
        prompt_ids: Sequence[int],
        config: GenerationConfig,
        adapter: ServedAdapter | None = None,
        *,
        tag: Any = None,
    ) -> DecodeSequence:
        """Validate a request against the context window; does not start it."""
        carry_on = adapter if isinstance(adapter, CarryOn) else None
        tail = adapter if isinstance(adapter, TailAdapter) else None
        if tail is not None:
            self._check_tail(tail)
        context = self.base.max_position_embeddings
        if not prompt_ids:
            raise ContextLengthError("the prompt is empty", param="messages")
        if len(prompt_ids) >= context:
            raise ContextLengthError(
                f"the prompt is {len(prompt_ids)} tokens; this model's context window is "
                f"{context} tokens",
                param="messages",
            )
        if carry_on is not None and carry_on.config.n_bases > 1:
            raise CustomizationError(
                "this carry-on mixes several base models; generation serves carry-ons "
                "that read one base",
                param="model",
                code="model_not_servable",
            )
        generator = None
        if not config.greedy:
            generator = torch.Generator(device="cpu")
            if config.seed is not None:
                generator.manual_seed(config.seed)
            else:
                generator.seed()
        return DecodeSequence(
            prompt_ids=list(prompt_ids),
            config=config,
            carry_on=carry_on,
            tail=tail,
            stop_token_ids=self.base.tokenizer.stop_token_ids,
            generator=generator,
            max_new_tokens=min(config.max_new_tokens, context - len(prompt_ids)),
            tag=tag,
        )

    def _check_tail(self, tail: TailAdapter) -> None:
        if tail.config.num_layers != self.base.num_layers:
            raise CustomizationError(
                f"this tail was made for a {tail.config.num_layers}-layer base; "
                f"{self.base.name} has {self.base.num_layers}",
                param="model",
                code="model_not_servable",
            )
        if self._tails is None:  # the first tail this base serves: wrap its linears once
            self._tails = batched_lora.install(self.base.model)

    def _backbone(self, rows: Sequence[DecodeSequence], **inputs: Any) -> Any:
        """One base forward; rows on tails get their LoRA deltas inside it."""
        tails = self._tails
        if tails is None or not any(s.tail is not None for s in rows):
            return self.base.backbone(**inputs)
        before = (tails.counters.delta_products, tails.counters.tail_rows)
        tails.use([s.tail for s in rows])
        try:
            return self.base.backbone(**inputs)
        finally:
            tails.clear()
            self.counters.tail_delta_products += tails.counters.delta_products - before[0]
            self.counters.tail_rows += tails.counters.tail_rows - before[1]

    @torch.inference_mode()
    def add(self, sequence: DecodeSequence) -> StepOutput:
        """Prefill ``sequence`` alone, sample its first token, join the running batch."""
        device = self.base.device
        ids = torch.tensor([sequence.prompt_ids], device=device)
        positions = torch.arange(len(sequence.prompt_ids), device=device).unsqueeze(0)
        cache = self._cache_class()
        outputs = self._backbone(
            [sequence],
            input_ids=ids,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=True,
        )
        self.counters.base_forwards += 1
        self.counters.prefill_tokens += len(sequence.prompt_ids)
        logits = _merged_logits(
            self.base, outputs.hidden_states, [sequence], positions, self.counters
        )
        output = self._accept(sequence, sample_token(logits[0], sequence))
        if not sequence.finished:
            self._join(sequence, outputs.past_key_values)
        return output

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One token for every running sequence, from one shared base forward."""
        if not self.sequences:
            return []
        assert self._attention is not None
        device = self.base.device
        rows = list(self.sequences)
        ids = torch.tensor([[s.generated[-1]] for s in rows], device=device)  # (B, 1)
        positions = torch.tensor([[s.position] for s in rows], device=device)  # (B, 1)
        ones = torch.ones((len(rows), 1), dtype=self._attention.dtype, device=device)
        self._attention = torch.cat([self._attention, ones], dim=1)  # (B, L + 1)
        outputs = self._backbone(
            rows,
            input_ids=ids,
            attention_mask=self._attention,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
            output_hidden_states=True,
        )
        self._cache = outputs.past_key_values
        self.counters.base_forwards += 1
        self.counters.decode_steps += 1
        self.counters.decode_rows += len(rows)
        logits = _merged_logits(self.base, outputs.hidden_states, rows, positions, self.counters)
        results = [self._accept(s, sample_token(logits[i], s)) for i, s in enumerate(rows)]
        self._drop_finished()
        return results

    def cancel(self, sequence: DecodeSequence) -> None:
        """Remove a sequence (e.g. its client went away) without finishing it."""
        if sequence in self.sequences:
            sequence.finish_reason = sequence.finish_reason or "stop"
            self._drop_finished()

    def _accept(self, sequence: DecodeSequence, token: int) -> StepOutput:
        if token in sequence.stop_token_ids:
            sequence.finish_reason = "stop"
            return StepOutput(sequence, token, _TextReleaser.update(self.base, sequence))
        sequence.generated.append(token)
        if len(sequence.generated) >= sequence.max_new_tokens:
            sequence.finish_reason = "length"
        delta = _TextReleaser.update(self.base, sequence)
        return StepOutput(sequence, token, delta)

    def _join(self, sequence: DecodeSequence, cache: Any) -> None:
        length = len(sequence.prompt_ids)
        device = self.base.device
        mask = torch.ones((1, length), dtype=torch.long, device=device)
        if self._cache is None:
            self._cache, self._attention = cache, mask
        else:
            assert self._attention is not None
            self._cache, self._attention = _concat_left_padded(
                self._cache_class, (self._cache, self._attention), (cache, mask)
            )
        self.sequences.append(sequence)

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self.sequences) if not s.finished]
        if len(keep) == len(self.sequences):
            return
        self.sequences = [self.sequences[i] for i in keep]
        if not keep:
            self._cache, self._attention = None, None
            return
        assert self._attention is not None
        self._cache.batch_select_indices(torch.tensor(keep, device=self.base.device))
        attention = self._attention[keep]
        # Slots that are padding for every remaining row can go.
        first_real = int(attention.argmax(dim=1).min())
        if first_real:
            self._cache = _trim_left(self._cache_class, self._cache, first_real)
            attention = attention[:, first_real:]
        self._attention = attention


def _concat_left_padded(
    cache_class: Any, left: tuple[Any, torch.Tensor], right: tuple[Any, torch.Tensor]
) -> tuple[Any, torch.Tensor]:
    """Concatenate two batches' caches along the batch, left-padding the shorter one.

    RoPE is applied before keys are cached, so shifting a row's slots right changes
    nothing once the padding slots are masked out.
    """
    (cache_a, mask_a), (cache_b, mask_b) = left, right
    width = max(mask_a.shape[1], mask_b.shape[1])

    def pad(t: torch.Tensor, extra: int) -> torch.Tensor:
        if not extra:
            return t
        shape = list(t.shape)
        shape[-2 if t.dim() == 4 else -1] = extra
        zeros = t.new_zeros(shape)
        return torch.cat([zeros, t], dim=-2 if t.dim() == 4 else -1)

    extra_a, extra_b = width - mask_a.shape[1], width - mask_b.shape[1]
    layers = []
    for (ka, va), (kb, vb) in zip(
        cache_a.to_legacy_cache(), cache_b.to_legacy_cache(), strict=True
    ):
        layers.append(
            (
                torch.cat([pad(ka, extra_a), pad(kb, extra_b)], dim=0),
                torch.cat([pad(va, extra_a), pad(vb, extra_b)], dim=0),
            )
        )
    mask = torch.cat([pad(mask_a, extra_a), pad(mask_b, extra_b)], dim=0)
    return cache_class.from_legacy_cache(tuple(layers)), mask


def _trim_left(cache_class: Any, cache: Any, slots: int) -> Any:
    layers = tuple((k[:, :, slots:], v[:, :, slots:]) for k, v in cache.to_legacy_cache())
    return cache_class.from_legacy_cache(layers)


# -- one-request conveniences ----------------------------------------------------------------


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
    yield decoder.add(sequence)
    while not sequence.finished:
        yield from decoder.step()


def generate(
    base: FrozenBase,
    prompt_ids: Sequence[int],
    config: GenerationConfig,
    adapter: ServedAdapter | None = None,
) -> GenerationResult:
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
