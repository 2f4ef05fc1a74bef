"""One base forward for the running rows and a joining prompt's chunk: packed, not padded.

A separate prefill forward costs the running rows at least one more decode step, however
few tokens it takes: every forward reads all of the base's weights and runs its hundreds of
small operations, and on a CPU that, not the arithmetic, is what a one-token step costs.
So while rows are running, the decoder packs the joining cohort's chunk into their decode
forward: the rows' one token each and the chunk's tokens go through the base as one
sequence of tokens (1, T), so every linear layer, norm and MLP runs once for all of them,
and only attention, which must not mix sequences, runs per *segment*:

- the running rows (B rows, 1 token each) attend over the batch's cache and its mask;
- the cohort (n rows, c tokens each) attends causally over its own cache.

Each segment writes its keys and values into its own cache (``GrowingCache``), so the
cohort's cache joins the batch afterwards exactly as after a prefill forward of its own.
Packing changes which tokens share a matmul, never what a token attends to: each row
computes what it computes alone.

``install`` points the served base's attention at ``packed_attention`` once; a forward
without a ``packed`` argument computes what transformers' own SDPA attention computes, bit
for bit (where a mask is given, without copying each key/value head per query head).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from types import SimpleNamespace
from typing import Any

import torch

ATTENTION = "carry_on_packed"


@dataclass
class Segment:
    """``rows`` × ``length`` of the packed tokens, row by row, with their own cache.

    ``mask`` (rows, K) marks the real slots (1) of the cache once this segment's tokens are
    in it: K = the cached slots + ``length``. The segment's queries are its last ``length``
    slots, each attending to the real slots up to its own.
    """

    ids: torch.Tensor  # (rows, length)
    positions: torch.Tensor  # (rows, length)
    mask: torch.Tensor  # (rows, K)
    cache: Any  # GrowingCache

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])

    @property
    def tokens(self) -> int:
        return self.rows * self.length

    @cached_property  # built once per forward, read by every layer
    def attention_mask(self) -> torch.Tensor | None:
        """(rows, 1, length, K) True where a query may attend, or None for "everything"."""
        if self.length == 1:
            return one_token_mask(self.mask)
        keys = self.mask.shape[1]
        real = self.mask.bool()[:, None, :]  # (rows, 1, K)
        query_slots = torch.arange(keys - self.length, keys, device=self.mask.device)
        causal = torch.arange(keys, device=self.mask.device)[None, :] <= query_slots[:, None]
        allowed = real & causal[None]  # (rows, length, K)
        # A left-pad query has no real slot to attend to: let it see itself, so its
        # (unused) output stays finite instead of the NaN of an empty softmax.
        own = torch.arange(keys - self.length, keys, device=self.mask.device)
        allowed[:, torch.arange(self.length), own] = True
        return allowed[:, None]

    def grouped_mask(self, groups: int) -> torch.Tensor | None:
        """``attention_mask`` for queries stacked ``groups`` deep (``_grouped_attention``),
        built once per forward."""
        if self.attention_mask is None:
            return None
        cached = self.__dict__.setdefault("_grouped_masks", {})
        if groups not in cached:
            cached[groups] = self.attention_mask.repeat(1, 1, groups, 1)  # (rows, 1, g·n, K)
        mask: torch.Tensor = cached[groups]
        return mask

    def heads(self, states: torch.Tensor, start: int) -> torch.Tensor:
        """This segment's part of a packed (1, H, T, hd) tensor as (rows, H, length, hd)."""
        heads, dim = states.shape[1], states.shape[-1]
        cut = states[0, :, start : start + self.tokens].view(heads, self.rows, self.length, dim)
        return cut.transpose(0, 1)

    def tokens_of(self, tensor: torch.Tensor, start: int) -> torch.Tensor:
        """This segment's part of a packed (1, T, D) tensor as (rows, length, D)."""
        return tensor[0, start : start + self.tokens].view(self.rows, self.length, -1)


def one_token_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """SDPA's mask for one query per row, the newest slot: (rows, 1, 1, K) True on the real
    slots of ``mask`` (rows, K), all of which lie before it; None where none is padding.

    The same mask transformers builds for such a forward, built in two operations: its
    builder calls a mask function over every slot (``vmap``), ~1.5 ms a step at batch 8.
    """
    real = mask.bool()
    return None if bool(real.all()) else real[:, None, None, :]


class Packed:
    """The segments of one packed forward, in order, and the inputs that run it."""

    def __init__(self, segments: Sequence[Segment]):
        self.segments = list(segments)

    def inputs(self) -> dict[str, Any]:
        """The backbone's inputs: every segment's tokens as one sequence (1, T)."""
        ids = torch.cat([s.ids.reshape(-1) for s in self.segments])
        positions = torch.cat([s.positions.reshape(-1) for s in self.segments])
        return {
            "input_ids": ids[None],
            "position_ids": positions[None],
            "use_cache": False,  # each segment writes its own cache, in the attention
            "packed": self,
        }

    def attend(
        self,
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None,
    ) -> torch.Tensor:
        """One layer's attention, segment by segment: (1, H, T, hd) in, (1, T, H, hd) out."""
        outputs = []
        start = 0
        for segment in self.segments:
            keys, values = segment.cache.update(
                segment.heads(key, start), segment.heads(value, start), module.layer_idx
            )
            groups = query.shape[1] // keys.shape[1]
            out = _grouped_attention(
                segment.heads(query, start), keys, values, segment.grouped_mask(groups), scaling
            )  # (rows, length, H, hd)
            outputs.append(out.reshape(1, segment.tokens, *out.shape[2:]))
            start += segment.tokens
        return torch.cat(outputs, dim=1)

    def split(self, outputs: Any) -> list[SimpleNamespace]:
        """Each segment's view of the packed outputs, shaped as its own forward's would be:
        ``last_hidden_state`` and ``hidden_states`` (rows, length, D), ``past_key_values``."""
        views = []
        start = 0
        states = getattr(outputs, "hidden_states", None)
        for segment in self.segments:
            views.append(
                SimpleNamespace(
                    last_hidden_state=segment.tokens_of(outputs.last_hidden_state, start),
                    hidden_states=None
                    if states is None
                    else tuple(None if s is None else segment.tokens_of(s, start) for s in states),
                    past_key_values=segment.cache,
                )
            )
            start += segment.tokens
        return views


class Sequences:
    """Right-padded training rows as one sequence of their real tokens (1, N).

    The tail's trainer (customization/tail.py) runs its layers on these: every linear
    layer, norm and MLP sees only the N real tokens, and attention runs causally per row
    (``split`` along the token axis), so a row computes exactly what it computes alone and
    padding costs nothing (a batch of 8 GSM8K chat examples is ~28 % padding).
    """

    def __init__(self, lengths: Sequence[int]):
        self.lengths = [int(n) for n in lengths]

    def attend(
        self,
        module: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None,
    ) -> torch.Tensor:
        """One layer's attention, row by row: (1, H, N, hd) in, (1, N, H, hd) out."""
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        rows = zip(
            query.split(self.lengths, dim=2),
            key.split(self.lengths, dim=2),
            value.split(self.lengths, dim=2),
            strict=True,
        )
        outputs = [
            sdpa_attention_forward(module, q, k, v, None, scaling=scaling)[0] for q, k, v in rows
        ]
        return torch.cat(outputs, dim=1)


def _grouped_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    grouped_mask: torch.Tensor | None,
    scaling: float | None,
) -> torch.Tensor:
    """SDPA with grouped key/value heads, without copying the keys and values per head.

    transformers repeats each key/value head for its query heads whenever there is a mask
    (a copy of the whole cache, every layer, every step); instead the query heads that
    share a key/value head are stacked along the query axis, which is the same attention.
    (rows, H, n, hd) queries over (rows, Hkv, K, hd) -> (rows, n, H, hd); the mask, if any,
    is already repeated for the stacked queries (rows, 1, groups · n, K).
    """
    rows, heads, length, dim = query.shape
    groups = heads // keys.shape[1]
    folded = query.reshape(rows, keys.shape[1], groups * length, dim)
    out = torch.nn.functional.scaled_dot_product_attention(
        folded, keys, values, attn_mask=grouped_mask, scale=scaling
    )  # (rows, Hkv, groups * n, hd)
    return out.reshape(rows, heads, length, dim).transpose(1, 2)


def packed_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
    packed: Packed | Sequences | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention per segment (serving) or per row (a tail's training) of a packed forward,
    else SDPA as before."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed is None:
        if attention_mask is not None and _grouped_sdpa_applies(
            module, query, key, attention_mask, dropout
        ):
            return _grouped_sdpa(query, key, value, attention_mask, scaling), None
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    return packed.attend(module, query, key, value, scaling), None


def _grouped_sdpa_applies(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor,
    dropout: float,
) -> bool:
    """Whether a forward with a mask (a batch with left padding) can run SDPA's own grouped
    key/value heads: at inference on a CPU, where the result is bit for bit the same."""
    return (
        attention_mask.dtype == torch.bool
        and getattr(module, "num_key_value_groups", 1) > 1
        and query.device.type == "cpu"
        and dropout == 0.0
        and not (query.requires_grad or key.requires_grad)
    )


def _grouped_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    """transformers' SDPA attention for a masked batch, less its copy of every key and value
    head per query head (``repeat_kv``; torch >= 2.5 takes ``enable_gqa`` with a mask on a
    CPU, which transformers leaves to CUDA). On a batch of 8 decoding this saved 9.7 ms of a
    88 ms step (the copies) and 5 of the attention's 8 ms."""
    mask = attention_mask[:, :, :, : key.shape[-2]]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True
    )  # (B, H, n, hd)
    return out.transpose(1, 2).contiguous()


def install(model: Any) -> None:
    """Point an HF causal LM's attention at ``packed_attention`` (idempotent).

    Only a base whose attention is SDPA is switched (its masks stay SDPA's); any other
    implementation is left alone, and the decoder does not pack for it (``installed``).
    """
    install_on_config(model.config)


def install_on_config(config: Any) -> bool:
    """``install`` for whatever modules read this HF config; True once it packs."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if config._attn_implementation == ATTENTION:
        return True
    if config._attn_implementation != "sdpa":
        return False
    AttentionInterface.register(ATTENTION, packed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    config._attn_implementation = ATTENTION
    return True


def installed(model: Any) -> bool:
    return bool(model.config._attn_implementation == ATTENTION)
