"""Many tails in one decode batch: the base's matmuls once, each row's LoRA delta gathered.

The serving base's linear layers are wrapped once (``install``). Before each forward the
decoder says which tail each row uses (``RowTails.use``); a wrapped layer then computes the
base's own product for the whole batch, and for the rows whose tail covers this layer adds

    delta[rows] = (x[rows] @ A_stacked) @ (B_stacked * scaling[rows])     (n, T, out)

as two batched matmuls over the gathered rows: the per-row gather of Punica's BGMV and
S-LoRA, in plain torch. The scaling is folded into the stacked B when it is stacked, and
where every row of the batch is on a tail (a single request on one, say) nothing is
gathered: the second product adds into the base's output in place (``baddbmm_``). At
batch 1 a step runs a few hundred of these small products, so each operation saved
is a visible share of the step. Ranks may differ between tails: the stacks are zero-padded
to the largest, and a layer no row's tail covers costs one attribute check.

Rows on the base or on a carry-on keep the base's output exactly. In a prefill (many tokens
per row) they are not touched at all. In a decode step (one token per row) the stacks hold
zeros for them instead, so the delta goes into every row in place: two products per layer
and module rather than a gather, two products and a scatter. Their share is x·0·0, an
exact zero, and at one token the products' extra arithmetic is far smaller than the
gather and scatter it saves (on a CPU, a step's small operations, not its arithmetic,
are what tails add to it).

A packed forward (``customization.packed``: the running rows' tokens and a joining chunk's
as one sequence) says how its tokens split into segments of rows × length; each segment's
rows then get their deltas as above, from their own slice of the tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from customization.config import ALL_LINEAR
from customization.tail import TailAdapter

# (row indices (n,) or None for "every row, in order", A (n, in, r), B · scaling (n, r, out))
Plan = tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]
# A forward's row segments: (rows, tokens per row) each, in order; None = the batch itself.
Segments = Sequence[tuple[int, int]] | None
# Row layouts whose stacked weights are kept: a decode forward's and a prefill forward's.
KEPT_LAYOUTS = 2


@dataclass
class LoraCounters:
    """Work done for tails, for tests and metrics."""

    delta_products: int = 0  # batched (A, B) product pairs run, one per layer and module
    tail_rows: int = 0  # rows on a tail, summed over forwards
    stacked: int = 0  # rows' weights stacked for a layer and module (when the rows change)


class RowTails:
    """Which tail each row of the current forward uses, and the stacked weights per layer."""

    def __init__(self, counters: LoraCounters | None = None):
        self.counters = counters if counters is not None else LoraCounters()
        self._tails: list[TailAdapter | None] = []
        self._plans: dict[tuple[int, str], list[Plan | None] | None] = {}
        self.segments: Segments = None
        self._dense: list[bool] = [False]  # per segment: stacks cover every row
        self.active = False  # some row of the current forward is on a tail
        # Row layout (the tails' ids, row by row, and the segments' rows) -> (those tails,
        # their plans), oldest first.
        self._layouts: dict[tuple[Any, ...], tuple[list[TailAdapter | None], dict[Any, Any]]] = {}

    def use(
        self,
        tails: Sequence[TailAdapter | None],
        segments: Segments = None,
        *,
        one_token: bool = False,
    ) -> None:
        """Say which tail each row of the next forward uses (and, packed, its segments;
        else ``one_token``: whether the forward is a decode step, one token per row).

        The stacked weights of a row layout are kept while it recurs: a running batch
        keeps its rows for many steps, so stacking (a copy of every row's LoRA weights)
        happens when rows join or leave, not every step. The layouts of the last
        ``KEPT_LAYOUTS`` forwards are kept (a step alternates the running rows' decode
        forward with a joining cohort's prefill forward).
        """
        self._tails = list(tails)
        self.segments = None if segments is None else list(segments)
        self.active = any(t is not None for t in self._tails)
        rows = None if segments is None else tuple(rows for rows, _ in segments)
        # Per segment: whether every row gets the delta (zeros for rows on no tail).
        self._dense = [one_token] if segments is None else [length == 1 for _, length in segments]
        key = (tuple(id(t) for t in self._tails), rows, tuple(self._dense))
        kept = self._layouts.pop(key, None)
        if kept is None or any(a is not b for a, b in zip(kept[0], self._tails, strict=True)):
            kept = (self._tails, {})
        self._layouts[key] = kept  # now the newest
        while len(self._layouts) > KEPT_LAYOUTS:
            del self._layouts[next(iter(self._layouts))]
        self._plans = kept[1]
        self.counters.tail_rows += sum(t is not None for t in tails)

    def clear(self) -> None:
        self._tails, self._plans, self.segments, self.active = [], {}, None, False
        self._dense = [False]

    def forget(self) -> None:
        """Drop every kept layout (and the references to the tails they hold)."""
        self.clear()
        self._layouts.clear()

    def plan(self, layer: int, name: str, device: torch.device) -> list[Plan | None] | None:
        """A plan per segment (one: the batch) for this layer and module; None: no row's."""
        key = (layer, name)
        if key not in self._plans:
            sizes = [len(self._tails)] if self.segments is None else [r for r, _ in self.segments]
            plans, first = [], 0
            for size, dense in zip(sizes, self._dense, strict=True):
                plans.append(self._stack(layer, name, device, first, first + size, dense))
                first += size
            self._plans[key] = None if all(p is None for p in plans) else plans
        return self._plans[key]

    def _stack(
        self, layer: int, name: str, device: torch.device, first: int, end: int, dense: bool
    ) -> Plan | None:
        """The stacked weights of rows ``first``..``end`` (indices relative to ``first``):
        of the rows on a tail covering this layer, or (``dense``) of every row, zeros for
        the others."""
        covered = {
            row - first: tail
            for row, tail in enumerate(self._tails[first:end], start=first)
            if tail is not None and (layer, name) in tail.weights
        }
        if not covered:
            return None
        rank = max(tail.weights[(layer, name)][0].shape[0] for tail in covered.values())
        a_any, b_any = next(iter(covered.values())).weights[(layer, name)]
        zero_a = a_any.new_zeros((a_any.shape[1], rank))
        zero_b = b_any.new_zeros((rank, b_any.shape[0]))
        rows = list(range(end - first)) if dense else list(covered)
        a_list, b_list = [], []
        for row in rows:
            tail = covered.get(row)
            if tail is None:
                a_list.append(zero_a)
                b_list.append(zero_b)
                continue
            a, b = tail.weights[(layer, name)]  # (r, in), (out, r)
            pad = rank - a.shape[0]
            a_list.append(nn.functional.pad(a.T, (0, pad)))  # (in, R)
            b_list.append(nn.functional.pad(b.T, (0, 0, 0, pad)) * tail.scaling)  # (R, out)
        every_row = len(rows) == end - first
        index = None if every_row else torch.tensor(rows, device=device)
        self.counters.stacked += 1
        return index, torch.stack(a_list), torch.stack(b_list)


class BatchedLoraLinear(nn.Module):
    """A base linear layer plus the per-row LoRA deltas ``RowTails`` plans for it."""

    wraps_linear = True  # customization.tail unwraps it when copying a served base's layers

    def __init__(self, base: nn.Linear, layer: int, name: str, rows: RowTails):
        super().__init__()
        self.base = base
        self.layer = layer
        self.name = name
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base(x)  # (B, T, out)
        if not self.rows.active:
            return y
        plans = self.rows.plan(self.layer, self.name, x.device)
        if plans is None:
            return y
        segments = self.rows.segments
        if segments is None:
            parts = [(x, y)]
        else:  # packed: (1, T, ·), each segment's rows × length tokens in turn
            parts, start = [], 0
            for rows, length in segments:
                end = start + rows * length
                parts.append(
                    (x[0, start:end].view(rows, length, -1), y[0, start:end].view(rows, length, -1))
                )
                start = end
        for (inputs, outputs), plan in zip(parts, plans, strict=True):
            if plan is None:
                continue
            index, a, b = plan
            self.rows.counters.delta_products += 1
            if index is None and a.dtype == outputs.dtype:  # every row: add in place
                outputs.baddbmm_(torch.bmm(inputs.to(a.dtype), a), b)
                continue
            picked = inputs if index is None else inputs.index_select(0, index)  # (n, T, in)
            delta = torch.bmm(torch.bmm(picked.to(a.dtype), a), b)  # (n, T, out)
            if index is None:
                outputs.add_(delta.to(outputs.dtype))
            else:
                outputs.index_add_(0, index, delta.to(outputs.dtype))  # into y, in place
        return y


def install(model: Any, counters: LoraCounters | None = None) -> RowTails:
    """Wrap every LoRA-targetable linear of an HF causal LM's decoder layers once;
    idempotent (``model`` is typed loosely, as transformers types it)."""
    existing = getattr(model, "_carry_on_row_tails", None)
    if isinstance(existing, RowTails):
        return existing
    rows = RowTails(counters)
    layers = model.get_decoder().layers
    for index, layer in enumerate(layers):
        for name, module in list(layer.named_modules()):
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in ALL_LINEAR:
                parent_name, _, child = name.rpartition(".")
                parent = layer.get_submodule(parent_name) if parent_name else layer
                setattr(parent, child, BatchedLoraLinear(module, index, name, rows))
    model._carry_on_row_tails = rows
    return rows
