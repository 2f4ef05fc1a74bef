"""Prefill of requests joining a running batch: several prompts per forward, long ones in chunks.

A ``Prefill`` is a cohort of sequences that start together. Their prompts are left-padded to
one width (the padding masked, so every row computes what it computes alone) and fed to the
base a chunk of columns at a time, into the cohort's own cache; the decoder runs at most one
such chunk per step, packed into its decode forward while rows are running
(``customization.packed``), so a long prompt delays the running rows by one chunk's
arithmetic per step instead of stalling them for its whole prompt.

Rows on carry-ons run their carry-on over their own (unpadded) columns of each chunk into
their own ``CarryOnCache``. The carry-on's attention is causal over that cache, so chunk by
chunk it computes what one pass over the whole prompt computes; when the cohort is done
the cache moves into the row's shape group with the row.
"""

from __future__ import annotations

from typing import Any

import torch

from customization.base_model import FrozenBase
from customization.carry_on import CarryOnCache
from customization.decode_state import DecodeCounters, DecodeSequence


def take_prompts(waiting: list[DecodeSequence], chunk: int) -> list[DecodeSequence]:
    """Remove and return the prompts to prefill together in one forward of ``chunk`` tokens.

    Oldest first, prompts that fit in one chunk, while rows × the longest prompt (the
    padded forward's size) stays within ``chunk``; longer prompts are left for chunking.
    """
    taken: list[DecodeSequence] = []
    width = 0
    for sequence in list(waiting):
        length = len(sequence.prompt_ids)
        if length > chunk:
            continue
        if (len(taken) + 1) * max(width, length) > chunk:
            break
        taken.append(sequence)
        width = max(width, length)
        waiting.remove(sequence)
    return taken


class Prefill:
    """Sequences prefilled together: prompts left-padded to one width, fed a chunk at a time."""

    def __init__(self, sequences: list[DecodeSequence], cache: Any, device: torch.device):
        lengths = [len(s.prompt_ids) for s in sequences]
        width = max(lengths)
        self.sequences = sequences
        self.cache = cache  # the base's, for these rows only, until they join the batch
        self.pads = [width - length for length in lengths]
        self.ids = torch.zeros((len(sequences), width), dtype=torch.long, device=device)
        self.mask = torch.zeros_like(self.ids)  # (n, W) 1 = prompt token, 0 = left pad
        for row, (sequence, pad) in enumerate(zip(sequences, self.pads, strict=True)):
            self.ids[row, pad:] = torch.tensor(sequence.prompt_ids, device=device)
            self.mask[row, pad:] = 1
        pads = torch.tensor(self.pads, device=device).unsqueeze(1)
        self.positions = (torch.arange(width, device=device) - pads).clamp(min=0)  # (n, W)
        self.carry_on_caches = [
            CarryOnCache() if s.carry_on is not None else None for s in sequences
        ]
        self.done = 0  # columns already fed to the base

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])

    @property
    def finished(self) -> bool:
        return self.done == self.width

    def chunk_inputs(self, chunk: int) -> dict[str, Any]:
        """The base forward's inputs for the next chunk: ``chunk`` tokens over all rows."""
        end = min(self.done + max(1, chunk // len(self.sequences)), self.width)
        return {
            "input_ids": self.ids[:, self.done : end],
            "attention_mask": self.mask[:, :end],  # the cached columns and this chunk's
            "position_ids": self.positions[:, self.done : end],
            "past_key_values": self.cache,
            "use_cache": True,
        }

    def absorb(self, base: FrozenBase, outputs: Any, counters: DecodeCounters) -> torch.Tensor:
        """Take in the forward of the next chunk: carry-on rows run their carry-on over it.

        Returns every row's final state (merged with its carry-on's correction) at the
        chunk's last column, (n, D); after the last chunk that is where the first token
        is sampled from.
        """
        final = outputs.last_hidden_state  # (n, C, D)
        start, end = self.done, self.done + final.shape[1]
        merged: torch.Tensor = final[:, -1, :].clone()  # (n, D)
        for row, sequence in enumerate(self.sequences):
            first = max(start, self.pads[row])
            if first >= end:  # all padding in this chunk
                continue
            counters.prefill_rows += 1
            counters.prefill_tokens += end - first
            carry_on, cache = sequence.carry_on, self.carry_on_caches[row]
            if carry_on is None:
                continue
            assert cache is not None
            columns = slice(first - start, end - start)
            taps = [
                outputs.hidden_states[base.resolve_tap(t)][row : row + 1, columns]
                for t in carry_on.config.taps
            ]  # each (1, c, D_i)
            positions = self.positions[row : row + 1, first:end]  # (1, c)
            out = carry_on(taps, final[row : row + 1, columns], positions, cache)  # (1, c, D)
            merged[row] = out[0, -1]
            counters.carry_on_forwards += 1
        self.done = end
        self.cache = outputs.past_key_values
        return merged
