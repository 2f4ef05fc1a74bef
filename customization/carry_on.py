"""The carry-on: a small transformer branch on a frozen base's hidden states.

    taps (B, T, D_i) ──norm, D_i→d──> mix or ladder ──> k blocks (d wide) ──> h (B, T, d)
    merged = x + α · sigmoid(W_g h + b_g) ⊙ W_up h          x: the base's final state
    logits = lm_head(merged)                                  the base's frozen LM head

``W_up`` starts at zero, so at initialisation (and whenever α = 0) the customized model is
exactly the base; training moves away from it only where the data asks for it. Why it
looks this way: docs/architecture.md, "The carry-on".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from customization.config import CarryOnConfig


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (x.float() * scale).to(x.dtype) * self.weight


def rope_tables(
    positions: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for rotary embeddings at integer ``positions`` (B, T)."""
    inv_freq = 1.0 / (
        theta
        ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )
    angles = positions.float().unsqueeze(-1) * inv_freq  # (B, T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, hd)
    return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)  # (B, 1, T, hd)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos.to(x.dtype) + _rotate_half(x) * sin.to(x.dtype)


@dataclass
class CarryOnCache:
    """The carry-on's own KV cache: one (keys, values) pair per block, each (B, H, T, hd)."""

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def length(self) -> int:
        first = self.keys[0] if self.keys else None
        return 0 if first is None else int(first.shape[2])

    def update(
        self, block: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.keys) <= block:
            self.keys.append(None)
            self.values.append(None)
        previous_keys, previous_values = self.keys[block], self.values[block]
        if previous_keys is not None and previous_values is not None:
            keys = torch.cat([previous_keys, keys], dim=2)
            values = torch.cat([previous_values, values], dim=2)
        self.keys[block], self.values[block] = keys, values
        return keys, values

    def nbytes(self) -> int:
        tensors = [t for t in (*self.keys, *self.values) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: CarryOnConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.d_model // config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.out = nn.Linear(config.d_model, config.d_model, bias=False)
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: CarryOnCache | None,
        block: int,
        past: int,
    ) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        q = q.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(block, k, v)  # (B, H, past + T, hd)
        mask = _causal_mask(length, past, x.device)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and length > 1,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, T, hd)
        return self.out(y.transpose(1, 2).reshape(batch, length, width))  # type: ignore[no-any-return]


def _causal_mask(length: int, past: int, device: torch.device) -> torch.Tensor | None:
    """None where SDPA's own causal flag (or no mask, for one query) is exact."""
    if past == 0 or length == 1:
        return None
    rows = torch.arange(length, device=device).unsqueeze(1) + past
    cols = torch.arange(past + length, device=device).unsqueeze(0)
    return cols <= rows  # (T, past + T)


class SwiGLU(nn.Module):
    def __init__(self, config: CarryOnConfig):
        super().__init__()
        # LLaMA's 2/3 rule keeps a SwiGLU as costly as a plain MLP of ``mlp_ratio``.
        hidden = int(config.mlp_ratio * config.d_model * 2 / 3)
        hidden = 8 * math.ceil(hidden / 8)
        self.gate = nn.Linear(config.d_model, hidden, bias=False)
        self.up = nn.Linear(config.d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))  # type: ignore[no-any-return]


class Block(nn.Module):
    """A pre-norm transformer block."""

    def __init__(self, config: CarryOnConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: CarryOnCache | None,
        block: int,
        past: int,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, block, past)
        return x + self.mlp(self.mlp_norm(x))  # type: ignore[no-any-return]


class CarryOn(nn.Module):
    """The trainable branch. Its config must be resolved (tap sizes and base width set)."""

    def __init__(self, config: CarryOnConfig, *, initialize: bool = True):
        """``initialize=False`` leaves the weights as the modules made them, for a caller that
        overwrites them all (a load: on the meta device torch runs an init through its
        Python reference kernels, which took 11 of a cold load's 18 ms)."""
        super().__init__()
        if not config.tap_sizes or not config.hidden_size:
            raise ValueError("CarryOn needs a resolved config: call config.resolved(...) first")
        self.config = config
        self.tap_norms = nn.ModuleList(RMSNorm(size, config.norm_eps) for size in config.tap_sizes)
        self.tap_projections = nn.ModuleList(
            nn.Linear(size, config.d_model, bias=False) for size in config.tap_sizes
        )
        # Learned scalar mix over taps ("mix" mode); uniform at start.
        self.tap_mix = nn.Parameter(torch.zeros(len(config.tap_sizes)))
        self.input_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_blocks))
        self.out_norm = RMSNorm(config.d_model, config.norm_eps)
        self.up = nn.Linear(config.d_model, config.hidden_size, bias=False)
        self.gate = nn.Linear(config.d_model, config.hidden_size, bias=True)
        self.register_buffer("alpha", torch.tensor(float(config.alpha)), persistent=False)
        if initialize:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
        std = 0.02 / math.sqrt(2 * self.config.n_blocks)
        for module in self.modules():
            # GPT-2's scaled init for the residual projections keeps depth stable.
            if isinstance(module, CausalSelfAttention):
                nn.init.normal_(module.out.weight, std=std)
            elif isinstance(module, SwiGLU):
                nn.init.normal_(module.down.weight, std=std)
        nn.init.zeros_(self.up.weight)
        assert self.gate.bias is not None
        nn.init.constant_(self.gate.bias, self.config.gate_bias_init)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_alpha(self, alpha: float) -> None:
        self.alpha.fill_(alpha)

    def materialize_buffers(self, device: str | torch.device) -> None:
        """Recreate the non-persistent buffers on ``device`` (after a meta-device build)."""
        self.alpha = torch.tensor(float(self.config.alpha), device=device)

    def _tap_input(self, index: int, tap: torch.Tensor) -> torch.Tensor:
        normed = self.tap_norms[index](tap.to(self.up.weight.dtype))
        return self.tap_projections[index](normed)  # type: ignore[no-any-return]

    def branch(
        self,
        taps: Sequence[torch.Tensor],
        positions: torch.Tensor,
        cache: CarryOnCache | None = None,
    ) -> torch.Tensor:
        """The carry-on's own stream h (B, T, d) from tap states, each (B, T, D_i)."""
        if len(taps) != len(self.tap_projections):
            raise ValueError(f"expected {len(self.tap_projections)} taps, got {len(taps)}")
        projected = [self._tap_input(i, tap) for i, tap in enumerate(taps)]  # each (B, T, d)
        rungs: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        if self.config.tap_mode == "mix":
            weights = torch.softmax(self.tap_mix, dim=0)
            h = sum(w * p for w, p in zip(weights, projected, strict=True))  # (B, T, d)
        else:
            h = projected[0]
            for tap, rung in zip(projected[1:], self.config.ladder_blocks, strict=True):
                rungs[rung].append(tap)
        h = self.input_dropout(h)
        cos, sin = rope_tables(
            positions, self.config.d_model // self.config.n_heads, self.config.rope_theta
        )
        past = 0 if cache is None else cache.length  # read before any block extends it
        for index, block in enumerate(self.blocks):
            for tap in rungs[index]:
                h = h + tap  # Ladder Side-Tuning: block j reads its own taps
            h = block(h, cos, sin, cache, index, past)
        return self.out_norm(h)  # type: ignore[no-any-return]

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """The correction α · g ⊙ Δx added to the base's final state, (B, T, D)."""
        alpha: torch.Tensor = self.alpha
        delta: torch.Tensor = alpha * torch.sigmoid(self.gate(h)) * self.up(h)
        return delta

    def forward(
        self,
        taps: Sequence[torch.Tensor],
        final_state: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: CarryOnCache | None = None,
    ) -> torch.Tensor:
        """The merged final state (B, T, D): feed it to the base's LM head."""
        if positions is None:
            start = 0 if cache is None else cache.length
            length = final_state.shape[1]
            positions = torch.arange(start, start + length, device=final_state.device)
            positions = positions.unsqueeze(0).expand(final_state.shape[0], -1)
        h = self.branch(taps, positions, cache)
        return final_state + self.delta(h).to(final_state.dtype)

    def artifact_nbytes(self, bytes_per_value: int = 4) -> int:
        return self.num_parameters() * bytes_per_value
