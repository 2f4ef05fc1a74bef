"""The running decode batch of one base: many requests, adapters mixed, one base forward a step.

The base forward does not depend on the carry-on, so a batch of sequences that use
*different* carry-ons (or none) shares one base forward per decode step; each carry-on then
runs only on its own rows, and the frozen LM head runs once over the merged states. This is
the structural advantage over LoRA serving, where an adapter touches every layer.

``BatchDecoder.add`` queues a request; each ``step`` then runs one decode forward for every
running row with one prefill chunk for joining ones (``prefill``: the prompts that arrived
together, a long prompt one chunk per step) packed into it (``packed``: the rows' tokens
and the chunk's go through the base as one sequence, attention per segment), after which
finished prompts sample their first token and join the batch (their cache merged in, the
narrower side left-padded) and finished sequences leave it. A separate prefill forward
would cost the running rows a whole extra step however short the chunk (every forward
reads all the weights); packed, a chunk costs only its own tokens' arithmetic, and while
rows are running the chunks of a long prompt are paced to add about 0.4 of their step
(measured: a dozen or two tokens on two CPU cores, far more on a GPU), however long the
prompt is. Rows whose carry-ons share a shape run as one batched forward
(``batched_carry_on``), the base's cache is written in place (``kv_cache``), and the base's
intermediate states are asked for only when some row's carry-on reads them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from customization import batched_lora, packed
from customization.base_model import FrozenBase
from customization.batched_carry_on import CarryOnGroup, shape_key
from customization.carry_on import CarryOn
from customization.config import GenerationConfig
from customization.decode_state import DecodeCounters, DecodeSequence, ServedAdapter, StepOutput
from customization.errors import ContextLengthError, CustomizationError
from customization.packed import Packed, Segment, one_token_mask
from customization.prefill import Prefill, take_prompts
from customization.sampling import releasable_text, sample_token
from customization.tail import TailAdapter

# Prompt tokens (padding included) one prefill forward may take: prompts that fit in it
# together are prefilled in one forward, a longer prompt in chunks.
DEFAULT_PREFILL_CHUNK = 256
# While rows are running, each chunk of a long prompt rides in their decode forward and is
# paced to add at most this share of their decode step (as measured), so the prompt delays
# their next token by well under a step however long it is; how many tokens fit depends
# on the machine, so it is learned, never below MIN_PREFILL_CHUNK tokens (nor above the
# prefill chunk). A chunk grows at most PREFILL_CHUNK_GROWTH-fold over the one before, so
# one chunk whose cost was lost in the step's noise cannot double the next one's.
# At 0.5 and twofold growth the others' worst gap across a 2,000-token prompt was 1.8-2.1
# steps on a 2-core AMD EPYC (their median gap 1.5): a chunk's cost there varies twofold
# from step to step for the same tokens, and the worst of a hundred chunks is what counts.
# At 0.4 and 1.5-fold it was 2.21-2.23 steps once the step itself got faster (prepacked
# kernels): the chunks' noise did not shrink with it. At 0.3 and 1.25-fold, 1.90-1.96 in
# three runs, the prompt's first token ~10 % later.
PREFILL_SHARE_OF_STEP = 0.3
PREFILL_CHUNK_GROWTH = 1.25
MIN_PREFILL_CHUNK = 8


def _group_taps(
    base: FrozenBase,
    hidden_states: Sequence[torch.Tensor],
    group: CarryOnGroup,
    rows: list[int],
    index: torch.Tensor | None,
) -> list[torch.Tensor]:
    """Each tap of a group's rows (``index``; None: every row, in order), (n, T, D_i);
    members may read different layers."""
    taps = []
    for tap in range(len(group.config.taps)):
        layers = [base.resolve_tap(c.config.taps[tap]) for c in group.carry_ons]
        if len(set(layers)) > 1:
            taps.append(
                torch.stack([hidden_states[i][r] for i, r in zip(layers, rows, strict=True)])
            )
        elif index is None:
            taps.append(hidden_states[layers[0]])
        else:
            taps.append(hidden_states[layers[0]].index_select(0, index))
    return taps


class BatchDecoder:
    """A running batch of sequences on one base, sharing the base forward per step."""

    def __init__(
        self,
        base: FrozenBase,
        *,
        counters: DecodeCounters | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        pace_prefill: bool = True,
        pack_prefill: bool = True,
    ):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1 token, got {prefill_chunk}")
        self.base = base
        self.counters = counters if counters is not None else DecodeCounters()
        self.prefill_chunk = prefill_chunk
        # Pacing (``pace_prefill``): the running rows' decode step in seconds (a moving
        # average) and the chunk learned to fit in it.
        self.pace_prefill = pace_prefill
        # Packing (``pack_prefill``): a joining chunk rides in the running rows' decode
        # forward, when the base's attention can be switched to ``packed_attention``.
        if pack_prefill:
            packed.install(base.model)
        self._pack = pack_prefill and packed.installed(base.model)
        # A decode step's mask is built here where the attention is SDPA's (``packed``).
        self._sdpa_mask = packed.installed(base.model)
        self._step_seconds: float | None = None
        self._paced_chunk = min(MIN_PREFILL_CHUNK, prefill_chunk)
        self.sequences: list[DecodeSequence] = []  # the running batch, in cache row order
        self._waiting: list[DecodeSequence] = []  # added, prefill not started
        self._chunking: Prefill | None = None  # a long prompt part-way through its prefill
        self._cache: Any = None
        self._attention: torch.Tensor | None = None  # (B, L) 1 = real slot, 0 = left pad
        # Running rows on carry-ons, by shape: each group is one batched forward per step.
        self._groups: dict[tuple[Any, ...], CarryOnGroup] = {}
        # Set once the base serves a tail: its linears then add per-row LoRA deltas.
        self._tails: batched_lora.RowTails | None = getattr(base.model, "_carry_on_row_tails", None)

    @property
    def active(self) -> int:
        """Sequences not finished: running, being prefilled or waiting for their prefill."""
        chunking = len(self._chunking.sequences) if self._chunking is not None else 0
        return len(self.sequences) + len(self._waiting) + chunking

    def kv_cache_bytes(self) -> int:
        """Bytes the KV caches hold now (their buffers, room to grow included): the running
        batch's, a long prompt's part-way through its prefill, and the carry-ons'. They grow
        with the requests' lengths and how they overlap, not with the adapters; may be read
        from another thread, and then may be one step old."""
        from customization.kv_cache import cache_tensors, held_bytes  # imports transformers

        chunking = self._chunking
        tensors = cache_tensors(self._cache)
        if chunking is not None:
            tensors += cache_tensors(chunking.cache)
            for carry_on_cache in chunking.carry_on_caches:
                if carry_on_cache is not None:
                    tensors += [*carry_on_cache.keys, *carry_on_cache.values]
        for group in list(self._groups.values()):
            tensors += [*group.keys, *group.values]
        return held_bytes(tensors)

    @property
    def unfinished(self) -> list[DecodeSequence]:
        """Every sequence not finished: running, being prefilled or waiting for its prefill."""
        chunking = list(self._chunking.sequences) if self._chunking is not None else []
        return [*self.sequences, *chunking, *self._waiting]

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

    def _backbone(
        self,
        rows: Sequence[DecodeSequence],
        *,
        segments: Sequence[Segment] | None = None,
        **inputs: Any,
    ) -> Any:
        """One base forward; rows on tails get their LoRA deltas inside it (a packed
        forward's ``segments`` say which tokens are whose).

        The base's intermediate states are asked for only where a row's carry-on reads them.
        """
        taps = {
            self.base.resolve_tap(tap)
            for s in rows
            if s.carry_on is not None
            for tap in s.carry_on.config.taps
        }
        states = inputs.pop("output_hidden_states", taps)
        tails = self._tails
        if tails is None or not any(s.tail is not None for s in rows):
            return self.base.backbone_forward(states=states, **inputs)
        before = (tails.counters.delta_products, tails.counters.tail_rows)
        layout = None if segments is None else [(s.rows, s.length) for s in segments]
        one_token = segments is None and inputs["input_ids"].shape[1] == 1
        tails.use([s.tail for s in rows], layout, one_token=one_token)
        try:
            return self.base.backbone_forward(states=states, **inputs)
        finally:
            tails.clear()
            self.counters.tail_delta_products += tails.counters.delta_products - before[0]
            self.counters.tail_rows += tails.counters.tail_rows - before[1]

    def add(self, sequence: DecodeSequence) -> None:
        """Queue ``sequence``: the next steps prefill it and it joins the running batch."""
        self._waiting.append(sequence)

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One token for every running sequence, and one prefill chunk for joining ones.

        While rows are running the chunk rides in their decode forward (``packed``); else
        it is a forward of its own. The outputs hold each sequence at most once: a running
        row's next token, or a joining row's first token when its prompt's last chunk was
        in this step.
        """
        cohort = self._next_cohort()
        if cohort is not None and self.sequences and self._pack:
            return self._packed_step(cohort)
        results = self._decode() if self.sequences else []
        return results + (self._prefill(cohort) if cohort is not None else [])

    def _next_cohort(self) -> Prefill | None:
        """The prompts this step prefills: the waiting ones that fit one chunk, together, or
        else the long prompt being chunked (a waiting one starts)."""
        from customization.kv_cache import GrowingCache  # imports transformers

        prompts = take_prompts(self._waiting, self.prefill_chunk)
        if prompts:
            return Prefill(prompts, GrowingCache(), self.base.device)
        if self._chunking is None and self._waiting:
            self._chunking = Prefill([self._waiting.pop(0)], GrowingCache(), self.base.device)
        return self._chunking

    def _decode_inputs(self, rows: Sequence[DecodeSequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """The running rows' next token ids and positions, (B, 1) each; their attention mask
        grows by the slot these tokens take."""
        assert self._attention is not None
        device = self.base.device
        ids = torch.tensor([[s.generated[-1]] for s in rows], device=device)
        positions = torch.tensor([[s.position] for s in rows], device=device)
        ones = torch.ones((len(rows), 1), dtype=self._attention.dtype, device=device)
        self._attention = torch.cat([self._attention, ones], dim=1)  # (B, L + 1)
        return ids, positions

    def _decode(self) -> list[StepOutput]:
        """One shared base forward for the running rows, one token each."""
        started = time.perf_counter()
        rows = list(self.sequences)
        ids, positions = self._decode_inputs(rows)
        assert self._attention is not None
        mask = one_token_mask(self._attention) if self._sdpa_mask else self._attention
        outputs = self._backbone(
            rows,
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
        )
        self.counters.base_forwards += 1
        logits = self._decoded(outputs, rows, positions)
        seconds = time.perf_counter() - started
        previous = self._step_seconds
        self._step_seconds = seconds if previous is None else 0.7 * previous + 0.3 * seconds
        return self._sample_rows(rows, logits)

    def _decoded(
        self, outputs: Any, rows: Sequence[DecodeSequence], positions: torch.Tensor
    ) -> torch.Tensor:
        """Take in a decode forward's outputs: the grown cache, counters, the rows' logits."""
        self._cache = outputs.past_key_values
        self.counters.decode_steps += 1
        self.counters.decode_rows += len(rows)
        return self._decode_logits(outputs, rows, positions)

    def _sample_rows(
        self, rows: Sequence[DecodeSequence], logits: torch.Tensor
    ) -> list[StepOutput]:
        results = [self._accept(s, self._sample(logits[i], s)) for i, s in enumerate(rows)]
        self._drop_finished()
        return results

    def _packed_step(self, cohort: Prefill) -> list[StepOutput]:
        """The running rows' decode and the cohort's next chunk in one packed base forward."""
        started = time.perf_counter()
        rows = list(self.sequences)
        ids, positions = self._decode_inputs(rows)
        assert self._attention is not None
        budget = self._chunk_budget() if cohort is self._chunking else self.prefill_chunk
        chunk = cohort.chunk_inputs(budget)
        packed = Packed(
            [
                Segment(ids, positions, self._attention, self._cache),
                Segment(
                    chunk["input_ids"], chunk["position_ids"], chunk["attention_mask"], cohort.cache
                ),
            ]
        )
        outputs = self._backbone(
            rows + cohort.sequences, segments=packed.segments, **packed.inputs()
        )
        decoded, prefilled = packed.split(outputs)
        self.counters.base_forwards += 1
        self.counters.packed_forwards += 1
        logits = self._decoded(decoded, rows, positions)
        self.counters.prefill_forwards += 1
        merged = cohort.absorb(self.base, prefilled, self.counters)
        if cohort is self._chunking and self._step_seconds is not None:
            # What the chunk added to the rows' step paces the next one.
            extra = time.perf_counter() - started - self._step_seconds
            self._pace(chunk["input_ids"].numel(), extra)
        results = self._sample_rows(rows, logits)
        return results + self._prefilled(cohort, merged)

    def _chunk_budget(self) -> int:
        """Tokens the next chunk of a long prompt may take: the whole prefill chunk when
        nobody is waiting for a token, else the paced chunk."""
        if not self.pace_prefill or not self.sequences or self._step_seconds is None:
            return self.prefill_chunk
        return self._paced_chunk

    def _pace(self, tokens: int, seconds: float) -> None:
        """After a chunk of ``tokens`` tokens that took the running rows ``seconds`` more
        than their step: size the next to add PREFILL_SHARE_OF_STEP of a step (growing at
        most PREFILL_CHUNK_GROWTH-fold at once)."""
        if not self.pace_prefill or self._step_seconds is None:
            return
        floor = min(MIN_PREFILL_CHUNK, self.prefill_chunk)
        grown = int(PREFILL_CHUNK_GROWTH * self._paced_chunk)
        if seconds <= 0:  # lost in the noise: grow
            fit = grown
        else:
            fit = int(tokens * PREFILL_SHARE_OF_STEP * self._step_seconds / seconds)
        self._paced_chunk = max(floor, min(fit, grown, self.prefill_chunk))

    def _prefill(self, cohort: Prefill) -> list[StepOutput]:
        """A prefill forward of its own for the cohort's next chunk (no rows are running,
        or the base cannot pack); rows whose prompt is done join."""
        paced = cohort is self._chunking
        started = time.perf_counter()
        inputs = cohort.chunk_inputs(self._chunk_budget() if paced else self.prefill_chunk)
        outputs = self._backbone(cohort.sequences, **inputs)
        if paced and self.sequences:  # running rows waited for this chunk
            self._pace(int(inputs["input_ids"].numel()), time.perf_counter() - started)
        self.counters.base_forwards += 1
        self.counters.prefill_forwards += 1
        merged = cohort.absorb(self.base, outputs, self.counters)  # (n, D)
        return self._prefilled(cohort, merged)

    def _prefilled(self, cohort: Prefill, merged: torch.Tensor) -> list[StepOutput]:
        """After a cohort's chunk: if its prompts are done, their first tokens, and the rows
        not finished by them join the batch."""
        if not cohort.finished:
            return []
        if cohort is self._chunking:
            self._chunking = None
        logits = self.base.logits(merged).float()  # (n, V)
        rows = cohort.sequences
        results = [self._accept(s, self._sample(logits[i], s)) for i, s in enumerate(rows)]
        self._join(cohort)
        return results

    def _decode_logits(
        self, outputs: Any, rows: Sequence[DecodeSequence], positions: torch.Tensor
    ) -> torch.Tensor:
        """Logits (B, V): each shape group's carry-ons as one batched forward, then the head.

        Base and tail rows are the base's final states untouched.
        """
        final = outputs.last_hidden_state  # (B, 1, D)
        merged = final[:, -1, :]  # (B, D), a view: cloned before a group writes into it
        cloned = False
        where = {id(s): row for row, s in enumerate(rows)}
        for group in self._groups.values():
            members = [where[id(m)] for m in group.members]
            if members == list(range(len(rows))):  # the whole batch (one row, often)
                taps = _group_taps(self.base, outputs.hidden_states, group, members, None)
                merged = group.forward(taps, final, positions)[:, -1]
            else:
                index = torch.tensor(members, device=final.device)
                out = group.forward(
                    _group_taps(self.base, outputs.hidden_states, group, members, index),
                    final.index_select(0, index),
                    positions.index_select(0, index),
                )  # (n, 1, D)
                if not cloned:
                    merged, cloned = merged.clone(), True
                merged[index] = out[:, -1]
            self.counters.carry_on_batches += 1
            self.counters.carry_on_forwards += len(group)
        return self.base.logits(merged).float()

    def cancel(self, sequence: DecodeSequence) -> None:
        """Remove a sequence (e.g. its client went away) without finishing it."""
        if sequence in self._waiting:
            self._waiting.remove(sequence)
        elif self._chunking is not None and sequence in self._chunking.sequences:
            self._chunking = None  # a long prompt prefills alone: the cohort is this one
        elif sequence not in self.sequences:
            return
        sequence.finish_reason = sequence.finish_reason or "stop"
        self._drop_finished()

    @staticmethod
    def _sample(logits: torch.Tensor, sequence: DecodeSequence) -> int:
        return sample_token(
            logits,
            sequence.config,
            prompt_ids=sequence.prompt_ids,
            generated=sequence.generated,
            generator=sequence.generator,
        )

    def _accept(self, sequence: DecodeSequence, token: int) -> StepOutput:
        if token in sequence.stop_token_ids:
            sequence.finish_reason = "stop"
            return StepOutput(sequence, token, self._release(sequence))
        sequence.generated.append(token)
        if len(sequence.generated) >= sequence.max_new_tokens:
            sequence.finish_reason = "length"
        return StepOutput(sequence, token, self._release(sequence))

    def _release(self, sequence: DecodeSequence) -> str:
        """The text newly released by the sequence's last token (maybe none)."""
        text, stopped = releasable_text(
            self.base.tokenizer.decode(sequence.generated),
            sequence.text,
            sequence.config.stop,
            finished=sequence.finished,
        )
        if stopped:
            sequence.finish_reason = "stop"
        if not text.startswith(sequence.text):
            # Rare: detokenization changed an earlier character; release nothing new.
            return ""
        delta = text[len(sequence.text) :]
        sequence.text = text
        return delta

    def _join(self, cohort: Prefill) -> None:
        """The cohort's unfinished rows enter the batch with their caches."""
        from customization.kv_cache import concat_left_padded, trim_padding

        keep = [i for i, s in enumerate(cohort.sequences) if not s.finished]
        if not keep:
            return
        cache, mask = cohort.cache, cohort.mask
        if len(keep) < len(cohort.sequences):
            cache.batch_select_indices(torch.tensor(keep, device=self.base.device))
            mask = mask[keep]
        cache, mask = trim_padding(cache, mask)
        if self._cache is None:
            self._cache, self._attention = cache, mask
        else:
            assert self._attention is not None
            self._cache, self._attention = concat_left_padded(
                (self._cache, self._attention), (cache, mask)
            )
        for row in keep:
            sequence, carry_on_cache = cohort.sequences[row], cohort.carry_on_caches[row]
            if sequence.carry_on is not None:
                assert carry_on_cache is not None
                group = self._groups.setdefault(shape_key(sequence.carry_on), CarryOnGroup())
                group.add(sequence, sequence.carry_on, carry_on_cache)
            self.sequences.append(sequence)

    def _drop_finished(self) -> None:
        from customization.kv_cache import trim_padding

        keep = [i for i, s in enumerate(self.sequences) if not s.finished]
        if len(keep) == len(self.sequences):
            return
        self.sequences = [self.sequences[i] for i in keep]
        for key, group in list(self._groups.items()):
            group.keep([i for i, member in enumerate(group.members) if not member.finished])
            if not len(group):
                del self._groups[key]
        if not keep:
            self._cache, self._attention = None, None
            if self._tails is not None:
                self._tails.forget()  # no row left: let go of the tails' stacked weights
            return
        assert self._attention is not None
        self._cache.batch_select_indices(torch.tensor(keep, device=self.base.device))
        # Slots that are padding for every remaining row can go.
        self._cache, self._attention = trim_padding(self._cache, self._attention[keep])
