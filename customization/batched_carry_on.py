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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from customization.carry_on import CarryOn, CarryOnCache, apply_rope, rope_tables
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
    """RMSNorm with a per-row weight (n, d), as ``carry_on.RMSNorm`` computes it."""
    scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (x.float() * scale).to(x.dtype) * weight.unsqueeze(1)


class CarryOnGroup:
    """The rows of one carry-on shape in a running batch: their weights and caches."""

    def __init__(self) -> None:
        self.members: list[Any] = []  # the caller's handle per row (its sequence)
        self.carry_ons: list[CarryOn] = []
        self.keys: list[torch.Tensor] = []  # per block (n, H, capacity, hd), right-padded
        self.values: list[torch.Tensor] = []
        self.lengths: torch.Tensor | None = None  # (n,) cached positions per row
        self._weights: dict[str, torch.Tensor] | None = None

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
        row_length = torch.tensor([length], device=carry_on.up.weight.device)
        self.lengths = row_length if self.lengths is None else torch.cat([self.lengths, row_length])
        self.members.append(member)
        self.carry_ons.append(carry_on)
        self._weights = None

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (indices into ``members``), in that order."""
        if len(rows) == len(self.members):
            return
        assert self.lengths is not None
        index = torch.tensor(list(rows), device=self.lengths.device, dtype=torch.long)
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.lengths = self.lengths.index_select(0, index)
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
        """Every member's parameters stacked (n, ...); linear weights as (n, in, out)."""
        if self._weights is None:
            named = [dict(c.named_parameters()) for c in self.carry_ons]
            stacked = {}
            for name, first in named[0].items():
                tensors = [n[name].detach() for n in named]
                if first.dim() == 2:  # an nn.Linear weight (out, in)
                    tensors = [t.T for t in tensors]
                stacked[name] = torch.stack(tensors)
            stacked["alpha"] = torch.stack([c.alpha for c in self.carry_ons]).view(-1, 1, 1)
            taps = range(len(self.config.taps))
            if len(set(self.config.tap_sizes)) == 1:  # one base: every tap as one product
                stacked["taps.norm"] = torch.stack(
                    [stacked[f"tap_norms.{i}.weight"] for i in taps]
                ).unsqueeze(2)  # (K, n, 1, D)
                projections = torch.stack([stacked[f"tap_projections.{i}.weight"] for i in taps])
                stacked["taps.projection"] = projections.flatten(0, 1)  # (K·n, D, d)
            self._weights = stacked
        return self._weights

    def _project_taps(
        self, taps: Sequence[torch.Tensor], w: dict[str, torch.Tensor]
    ) -> list[torch.Tensor]:
        """Each tap normed and projected, (n, T, d) each: one norm and one ``bmm`` for all
        of them when they share a width (a decode step runs this for every token, and eight
        taps one by one were ~70 small operations of the step's few hundred)."""
        config, dtype = self.config, w["up.weight"].dtype
        if "taps.norm" not in w:
            return [
                torch.bmm(
                    _norm(tap.to(dtype), w[f"tap_norms.{i}.weight"], config.norm_eps),
                    w[f"tap_projections.{i}.weight"],
                )
                for i, tap in enumerate(taps)
            ]
        x = torch.stack(list(taps)).to(dtype)  # (K, n, T, D)
        scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + config.norm_eps)
        normed = (x.float() * scale).to(dtype) * w["taps.norm"]
        count, rows, length, width = normed.shape
        out = torch.bmm(normed.view(count * rows, length, width), w["taps.projection"])
        return list(out.view(count, rows, length, -1).unbind(0))

    def forward(
        self, taps: Sequence[torch.Tensor], final_state: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """The merged final states (n, T, D) of every row, extending every row's cache.

        ``taps`` are each (n, T, D_i), ``final_state`` (n, T, D), ``positions`` (n, T).
        """
        config, w = self.config, self.weights()
        assert self.lengths is not None
        projected = self._project_taps(taps, w)  # each (n, T, d)
        rungs: list[list[torch.Tensor]] = [[] for _ in range(config.n_blocks)]
        if config.tap_mode == "mix":
            mix = torch.softmax(w["tap_mix"], dim=-1)  # (n, taps)
            h = sum(mix[:, i].view(-1, 1, 1) * p for i, p in enumerate(projected))
            assert isinstance(h, torch.Tensor)
        else:
            h = projected[0]
            for tap, rung in zip(projected[1:], config.ladder_blocks, strict=True):
                rungs[rung].append(tap)
        cos, sin = rope_tables(positions, config.d_model // config.n_heads, config.rope_theta)
        length = h.shape[1]
        self._grow(int(self.lengths.max()) + length)
        for block in range(config.n_blocks):
            for tap in rungs[block]:
                h = h + tap
            h = self._block(block, h, cos, sin, w)
        h = _norm(h, w["out_norm.weight"], config.norm_eps)
        gate = torch.sigmoid(torch.bmm(h, w["gate.weight"]) + w["gate.bias"].unsqueeze(1))
        delta = w["alpha"] * gate * torch.bmm(h, w["up.weight"])  # (n, T, D)
        self.lengths = self.lengths + length
        return final_state + delta.to(final_state.dtype)

    def _block(
        self,
        block: int,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        w: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        config, prefix = self.config, f"blocks.{block}."
        assert self.lengths is not None
        rows, length, width = h.shape
        heads, head_dim = config.n_heads, width // config.n_heads
        x = _norm(h, w[prefix + "attn_norm.weight"], config.norm_eps)
        q, k, v = torch.bmm(x, w[prefix + "attn.qkv.weight"]).split(width, dim=-1)
        q = q.view(rows, length, heads, head_dim).transpose(1, 2)  # (n, H, T, hd)
        k = k.view(rows, length, heads, head_dim).transpose(1, 2)
        v = v.view(rows, length, heads, head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # Each row writes its new slots at its own length: (n, T) slot indices.
        slots = self.lengths.unsqueeze(1) + torch.arange(length, device=h.device)
        row_index = torch.arange(rows, device=h.device).unsqueeze(1)
        self.keys[block][row_index, :, slots] = k.transpose(1, 2)
        self.values[block][row_index, :, slots] = v.transpose(1, 2)
        span = int(slots.max()) + 1
        columns = torch.arange(span, device=h.device)
        mask = columns.view(1, 1, -1) <= slots.unsqueeze(-1)  # (n, T, span): causal per row
        y = F.scaled_dot_product_attention(
            q,
            self.keys[block][:, :, :span],
            self.values[block][:, :, :span],
            attn_mask=mask.unsqueeze(1),
        )  # (n, H, T, hd)
        h = h + torch.bmm(
            y.transpose(1, 2).reshape(rows, length, width), w[prefix + "attn.out.weight"]
        )
        x = _norm(h, w[prefix + "mlp_norm.weight"], config.norm_eps)
        hidden = F.silu(torch.bmm(x, w[prefix + "mlp.gate.weight"])) * torch.bmm(
            x, w[prefix + "mlp.up.weight"]
        )
        return h + torch.bmm(hidden, w[prefix + "mlp.down.weight"])
