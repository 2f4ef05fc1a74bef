"""Many carry-ons of one shape in one decode step: weights stacked, one batched forward.

Carry-ons whose configs give the same tensor shapes (``shape_key``) form a ``CarryOnGroup``.
The group stacks its members' weights along a leading row axis, so a decode step runs each
linear layer of every member as one ``torch.bmm``

    (n, T, in) @ (n, in, out) -> (n, T, out)          n: rows in the group

which is the arithmetic of each carry-on alone in one kernel per layer instead of one per
row. Each row's attention keys and values live in one right-padded tensor per block,
(n, H, capacity, hd), with per-row lengths: a step writes each row's new keys at its own
length, and the capacity doubles when it runs out, so nothing is concatenated per step.
Taps may differ between members (each row's taps are gathered for it); everything that
sets a tensor shape must match.

A decode step is a few dozen small operations on top of a base step of a few hundred
matmuls, so their count is what a carry-on costs at batch 1: products that share an input
are fused into one (a block's taps, side by side, through one projection; SwiGLU's gate
and up), adds ride in the products (``baddbmm``), the rotary embedding takes three
operations for queries and keys together, and where every row is at the same length (one
request, often) the cache is written by slice and attention needs no mask.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from customization.carry_on import CarryOn, CarryOnCache
from customization.config import CarryOnConfig


def shape_key(carry_on: CarryOn) -> tuple[Any, ...]:
    """What two carry-ons must share to run as one batched forward."""
    c: CarryOnConfig = carry_on.config
    weight = carry_on.up.weight
    return (
        *(c.d_model, c.n_blocks, c.n_heads, c.mlp_ratio, c.tap_sizes, c.tap_mode),
        *(c.ladder_blocks, c.hidden_size, c.norm_eps, c.rope_theta),
        weight.dtype,
        weight.device,
    )


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of (n, T, d) with a per-row weight (n, d), as ``carry_on.RMSNorm`` computes
    it (the statistics in float32, the weight in the model's dtype)."""
    width = x.shape[-1]
    return F.rms_norm(x.float(), (width,), eps=eps).to(x.dtype) * weight.unsqueeze(1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """``carry_on.apply_rope`` in three operations: rotate_half(x) * sin is
    roll(x, hd/2) * sin with the first half of sin negated."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


def _rung_spans(config: CarryOnConfig) -> list[tuple[int, int]]:
    """Per block, the range of taps added to the stream before it: tap 0 and its rung for
    the first block ("mix": every tap, mixed, there), each later block its own rung.

    Rungs are contiguous (earlier taps to earlier blocks), so each block's taps are one
    slice of the taps laid side by side, projected by one product.
    """
    if config.tap_mode == "mix":
        return [(0, len(config.taps))] + [(0, 0)] * (config.n_blocks - 1)
    blocks = [0, *config.ladder_blocks]
    if blocks != sorted(blocks):
        raise ValueError(f"ladder rungs must be in tap order, got {list(config.ladder_blocks)}")
    spans = []
    for block in range(config.n_blocks):
        taps = [i for i, b in enumerate(blocks) if b == block]
        spans.append((taps[0], taps[-1] + 1) if taps else (0, 0))
    return spans


class CarryOnGroup:
    """The rows of one carry-on shape in a running batch: their weights and caches."""

    def __init__(self) -> None:
        self.members: list[Any] = []  # the caller's handle per row (its sequence)
        self.carry_ons: list[CarryOn] = []
        self.keys: list[torch.Tensor] = []  # per block (n, H, capacity, hd), right-padded
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []  # cached positions per row
        self._weights: dict[str, torch.Tensor] | None = None
        self._rungs: list[tuple[int, int, int]] = []  # (block, first, last tap column)
        self._inv_freq: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.members)

    @property
    def config(self) -> CarryOnConfig:
        return self.carry_ons[0].config

    def add(self, member: Any, carry_on: CarryOn, cache: CarryOnCache) -> None:
        """A row joins with the cache its prefill filled (each block (1, H, L, hd))."""
        length = cache.length
        if self.keys:
            self._grow(length)
            capacity = int(self.keys[0].shape[2])
        else:
            capacity = length
        for block, (k, v) in enumerate(zip(cache.keys, cache.values, strict=True)):
            assert k is not None
            assert v is not None
            k, v = (F.pad(t, (0, 0, 0, capacity - length)) for t in (k, v))  # (1, H, cap, hd)
            if block < len(self.keys):
                self.keys[block] = torch.cat([self.keys[block], k])
                self.values[block] = torch.cat([self.values[block], v])
            else:
                self.keys.append(k)
                self.values.append(v)
        self.lengths.append(length)
        self.members.append(member)
        self.carry_ons.append(carry_on)
        self._weights = None

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (indices into ``members``), in that order."""
        if len(rows) == len(self.members):
            return
        index = torch.tensor(list(rows), device=self.keys[0].device, dtype=torch.long)
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.lengths = [self.lengths[i] for i in rows]
        self.members = [self.members[i] for i in rows]
        self.carry_ons = [self.carry_ons[i] for i in rows]
        self._weights = None

    def _grow(self, needed: int) -> None:
        capacity = int(self.keys[0].shape[2]) if self.keys else 0
        if needed <= capacity or not self.keys:
            return
        new = max(needed, 2 * capacity)
        self.keys = [F.pad(k, (0, 0, 0, new - capacity)) for k in self.keys]
        self.values = [F.pad(v, (0, 0, 0, new - capacity)) for v in self.values]

    def weights(self) -> dict[str, torch.Tensor]:
        """Every member's parameters stacked (n, ...), linear weights as (n, in, out), and
        fused where one product can do the work of several: each block's taps projected by
        one (n, taps·D, d) weight ("taps.{block}"; "mix" folds its softmax weights in), a
        block's SwiGLU gate and up as one (n, d, 2·hidden) weight, α folded into ``up``
        ("up.scaled")."""
        if self._weights is None:
            named = [dict(c.named_parameters()) for c in self.carry_ons]
            w = {}
            for name, first in named[0].items():
                tensors = [n[name].detach() for n in named]
                if first.dim() == 2:  # an nn.Linear weight (out, in)
                    tensors = [t.T for t in tensors]
                w[name] = torch.stack(tensors)
            # The fused weights replace the ones they were made of (a stack holds a copy of
            # every row's weights: no second copy is kept).
            config, count = self.config, len(self.config.taps)
            w["taps.norm"] = torch.cat(
                [w.pop(f"tap_norms.{i}.weight") for i in range(count)], dim=-1
            ).unsqueeze(1)  # (n, 1, ΣD_i)
            projections = [w.pop(f"tap_projections.{i}.weight") for i in range(count)]
            mix_logits = w.pop("tap_mix")  # (n, taps), read by "mix" only
            if config.tap_mode == "mix":
                mix = torch.softmax(mix_logits, dim=-1)
                projections = [mix[:, i].view(-1, 1, 1) * p for i, p in enumerate(projections)]
            bounds = [0, *itertools.accumulate(config.tap_sizes)]  # each tap's columns
            self._rungs = []
            for block, (start, stop) in enumerate(_rung_spans(config)):
                if stop > start:
                    w[f"taps.{block}"] = torch.cat(projections[start:stop], dim=1)
                    self._rungs.append((block, bounds[start], bounds[stop]))
            for block in range(config.n_blocks):
                prefix = f"blocks.{block}.mlp."
                w[prefix + "gate_up"] = torch.cat(
                    [w.pop(prefix + "gate.weight"), w.pop(prefix + "up.weight")], dim=-1
                )
            alpha = torch.stack([c.alpha for c in self.carry_ons]).view(-1, 1, 1)
            up = w.pop("up.weight")
            w["up.scaled"] = up * alpha.to(up.dtype) if bool((alpha != 1).any()) else up
            self._weights = w
        return self._weights

    def _rotary(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin at ``positions`` (n, T), each (n, T, 1, 1, hd): they
        broadcast over queries and keys together and over heads (``_rotate``)."""
        config = self.config
        head_dim = config.d_model // config.n_heads
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            steps = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32)
            self._inv_freq = 1.0 / (config.rope_theta ** (steps / head_dim))
        angles = positions.float().unsqueeze(-1) * self._inv_freq  # (n, T, hd/2)
        cos, sin = angles.cos(), angles.sin()
        cos = torch.cat([cos, cos], dim=-1).to(dtype)[:, :, None, None]
        sin = torch.cat([-sin, sin], dim=-1).to(dtype)[:, :, None, None]
        return cos, sin

    def _tap_inputs(self, taps: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The taps normed each by its own RMS and laid side by side, (n, T, ΣD_i): one
        norm for all when they share a width (a decode step runs this for every token)."""
        config = self.config
        if len(set(config.tap_sizes)) == 1:
            x = torch.stack(list(taps), dim=2).to(dtype)  # (n, T, K, D)
            normed = F.rms_norm(x.float(), (x.shape[-1],), eps=config.norm_eps).to(dtype)
            return normed.flatten(2)
        return torch.cat(
            [
                F.rms_norm(t.to(dtype).float(), (t.shape[-1],), eps=config.norm_eps).to(dtype)
                for t in taps
            ],
            dim=-1,
        )

    def forward(
        self, taps: Sequence[torch.Tensor], final_state: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """The merged final states (n, T, D) of every row, extending every row's cache.

        ``taps`` are each (n, T, D_i), ``final_state`` (n, T, D), ``positions`` (n, T).
        """
        config, w = self.config, self.weights()
        dtype = w["up.scaled"].dtype
        x = self._tap_inputs(taps, dtype) * w["taps.norm"]  # (n, T, ΣD_i)
        length = x.shape[1]
        self._grow(max(self.lengths) + length)
        cos, sin = self._rotary(positions, dtype)
        write = _Write(self.keys, self.values, self.lengths, length, cos, sin)
        rungs = {block: (first, last) for block, first, last in self._rungs}
        h: torch.Tensor | None = None
        for block in range(config.n_blocks):
            if block in rungs:
                first, last = rungs[block]
                rung, weight = x[..., first:last], w[f"taps.{block}"]
                h = torch.bmm(rung, weight) if h is None else torch.baddbmm(h, rung, weight)
            assert h is not None
            h = self._block(block, h, write, w)
        assert h is not None
        h = _norm(h, w["out_norm.weight"], config.norm_eps)
        gate = torch.sigmoid(torch.baddbmm(w["gate.bias"].unsqueeze(1), h, w["gate.weight"]))
        self.lengths = [n + length for n in self.lengths]
        delta = gate * torch.bmm(h, w["up.scaled"])  # (n, T, D)
        return final_state + delta.to(final_state.dtype)

    def _block(
        self, block: int, h: torch.Tensor, write: _Write, w: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        config, prefix = self.config, f"blocks.{block}."
        rows, length, width = h.shape
        heads, head_dim = config.n_heads, width // config.n_heads
        x = _norm(h, w[prefix + "attn_norm.weight"], config.norm_eps)
        qkv = torch.bmm(x, w[prefix + "attn.qkv.weight"]).view(rows, length, 3, heads, head_dim)
        qk = _rotate(qkv[:, :, :2], write.cos, write.sin)  # (n, T, 2, H, hd)
        q, k = qk[:, :, 0].transpose(1, 2), qk[:, :, 1]  # q (n, H, T, hd), k (n, T, H, hd)
        keys, values = write(block, k, qkv[:, :, 2])
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=write.mask)  # (n, H, T, hd)
        h = torch.baddbmm(
            h, y.transpose(1, 2).reshape(rows, length, width), w[prefix + "attn.out.weight"]
        )
        x = _norm(h, w[prefix + "mlp_norm.weight"], config.norm_eps)
        gate, up = torch.bmm(x, w[prefix + "mlp.gate_up"]).chunk(2, dim=-1)
        return torch.baddbmm(h, F.silu(gate) * up, w[prefix + "mlp.down.weight"])


class _Write:
    """One decode step's cache writes and attention shapes, the same for every block: the
    rotary tables, where each row's new keys go, and the causal mask (None where every row
    is at the same length and the step is one token: each attends to all it has). The
    caches must already have room for the step (``CarryOnGroup._grow``)."""

    def __init__(
        self,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        lengths: list[int],
        length: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ):
        self.keys, self.values, self.cos, self.sin = keys, values, cos, sin
        self.span = max(lengths) + length
        self.start: int | None = lengths[0] if len(set(lengths)) == 1 else None
        device = cos.device
        if self.start is not None:
            self.mask = None if length == 1 else _causal(self.start, length, device)
        else:
            # Each row writes its new slots at its own length: (n, T) slot indices.
            starts = torch.tensor(lengths, device=device)
            self.slots = starts.unsqueeze(1) + torch.arange(length, device=device)
            self.rows = torch.arange(len(lengths), device=device).unsqueeze(1)
            columns = torch.arange(self.span, device=device)
            self.mask = (columns.view(1, 1, -1) <= self.slots.unsqueeze(-1)).unsqueeze(1)

    def __call__(
        self, block: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a block's new keys and values, each (n, T, H, hd); its cache up to the
        longest row, each (n, H, span, hd)."""
        keys, values = self.keys[block], self.values[block]
        if self.start is not None:
            end = self.start + k.shape[1]
            keys[:, :, self.start : end] = k.transpose(1, 2)
            values[:, :, self.start : end] = v.transpose(1, 2)
        else:
            keys[self.rows, :, self.slots] = k
            values[self.rows, :, self.slots] = v
        return keys[:, :, : self.span], values[:, :, : self.span]


def _causal(start: int, length: int, device: torch.device) -> torch.Tensor:
    """(1, 1, T, start + T): query t sees the slots up to start + t."""
    rows = torch.arange(length, device=device).unsqueeze(1) + start
    return (torch.arange(start + length, device=device).unsqueeze(0) <= rows)[None, None]
