"""The base's KV cache for a decode batch, preallocated so a step writes instead of copying.

transformers' ``DynamicCache`` concatenates every layer's keys and values with the new
token at every step, copying the whole cache each time. ``GrowingCache`` keeps each layer's
keys and values in buffers (B, H, capacity, hd) and exposes views of the filled part; a step
writes its slot in place and the capacity doubles when full, so copies happen only
O(log length) times, plus once when a row joins or leaves the batch: the batch is
left-padded (its attention mask marks the padding), ``concat_left_padded`` joins two batches
and ``trim_padding`` drops the slots that are padding for every row.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """One layer's keys and values: views into buffers that double when full."""

    def __init__(self) -> None:
        super().__init__()
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return 0 if self._key_buffer is None else int(self._key_buffer.shape[-2])

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        if end > self.capacity:
            self._reallocate(key_states, value_states, max(end, 2 * self.capacity), start)
        keys, values = self._expose(end)
        keys[:, :, start:end] = key_states  # writes into the buffers
        values[:, :, start:end] = value_states
        return keys, values

    def _reallocate(
        self, like_keys: torch.Tensor, like_values: torch.Tensor, capacity: int, length: int
    ) -> None:
        keys = like_keys.new_zeros((*like_keys.shape[:2], capacity, like_keys.shape[-1]))
        values = like_values.new_zeros((*like_values.shape[:2], capacity, like_values.shape[-1]))
        if length:
            old_keys, old_values = self.keys, self.values
            assert old_keys is not None
            assert old_values is not None
            keys[:, :, :length] = old_keys
            values[:, :, :length] = old_values
        self._key_buffer, self._value_buffer = keys, values

    def _expose(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Point ``keys``/``values`` at the first ``length`` slots of the buffers."""
        assert self._key_buffer is not None
        assert self._value_buffer is not None
        keys = self._key_buffer[:, :, :length]  # (B, H, L, hd), a view
        values = self._value_buffer[:, :, :length]
        self.keys, self.values = keys, values
        return keys, values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._key_buffer is None or self._value_buffer is None:
            return
        length = self.get_seq_length()
        self._key_buffer = self._key_buffer[indices]
        self._value_buffer = self._value_buffer[indices]
        self._expose(length)


class GrowingCache(DynamicCache):
    """A ``DynamicCache`` whose layers are ``GrowingLayer``s (built lazily, layer by layer)."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)

    @property
    def capacity(self) -> int:
        """Slots allocated per row (the first layer's; every layer grows alike)."""
        first = self.layers[0] if self.layers else None
        return first.capacity if isinstance(first, GrowingLayer) else 0


def held_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct buffers behind ``tensors``: a view counts the whole buffer it
    looks into (a growing cache's room included), a buffer seen twice counts once."""
    sizes: dict[int, int] = {}
    for tensor in tensors:
        if tensor is not None:
            storage = tensor.untyped_storage()
            sizes[storage.data_ptr()] = storage.nbytes()
    return sum(sizes.values())


def cache_tensors(cache: Cache | None) -> list[torch.Tensor | None]:
    """Every layer's keys and values of a base's cache (None: no cache), for ``held_bytes``."""
    tensors: list[torch.Tensor | None] = []
    for layer in list(cache.layers) if cache is not None else []:
        tensors += [getattr(layer, "keys", None), getattr(layer, "values", None)]
    return tensors


def concat_left_padded(
    left: tuple[GrowingCache, torch.Tensor], right: tuple[GrowingCache, torch.Tensor]
) -> tuple[GrowingCache, torch.Tensor]:
    """Two batches' (cache, attention mask) as one, the narrower one left-padded.

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
    return _from_layers(layers), mask


def trim_padding(cache: GrowingCache, mask: torch.Tensor) -> tuple[GrowingCache, torch.Tensor]:
    """Drop the leading slots that are padding for every row (mask (B, L), 0 = pad)."""
    first_real = int(mask.argmax(dim=1).min())
    if not first_real:
        return cache, mask
    layers = tuple((k[:, :, first_real:], v[:, :, first_real:]) for k, v in cache.to_legacy_cache())
    return _from_layers(layers), mask[:, first_real:]


def _from_layers(layers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> GrowingCache:
    """A new cache holding a copy of each layer's (keys, values), with room to grow.

    Without the room the next step's slot would not fit, and the step after a row joined or
    left would copy the whole cache a second time to double it.
    """
    cache = GrowingCache()
    for keys, values in layers:
        layer = GrowingLayer()
        layer.lazy_initialization(keys)
        length = int(keys.shape[-2])
        layer._reallocate(keys, values, length + max(16, length // 4), 0)  # room, no copy
        kept_keys, kept_values = layer._expose(length)
        kept_keys.copy_(keys)
        kept_values.copy_(values)
        cache.layers.append(layer)
    return cache
