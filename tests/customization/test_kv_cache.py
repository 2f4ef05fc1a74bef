"""The preallocated KV cache: DynamicCache's contents, without a copy per step."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from customization.kv_cache import GrowingCache, concat_left_padded, trim_padding


def test_growing_cache_holds_what_dynamic_cache_holds_and_doubles_when_full() -> None:
    """One-token updates give DynamicCache's keys and values; capacity only doubles."""
    generator = torch.Generator().manual_seed(0)
    growing, dynamic = GrowingCache(), DynamicCache()
    capacities = []
    for length in (5, *([1] * 40)):
        for layer in range(2):
            keys, values = (torch.randn(3, 2, length, 4, generator=generator) for _ in "kv")
            ours = growing.update(keys, values, layer)
            theirs = dynamic.update(keys, values, layer)
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
        capacities.append(growing.capacity)
    assert growing.get_seq_length() == dynamic.get_seq_length() == 45
    assert sorted(set(capacities)) == [5, 10, 20, 40, 80]


def test_selecting_rows_keeps_their_slots_and_room_to_grow() -> None:
    """Dropping rows keeps the kept rows' keys and the buffer's capacity."""
    cache = GrowingCache()
    keys = torch.arange(3 * 6, dtype=torch.float32).view(3, 1, 6, 1)
    cache.update(keys, -keys, 0)
    cache.update(keys[:, :, :1], keys[:, :, :1], 0)  # 7 slots used of 12
    cache.batch_select_indices(torch.tensor([0, 2]))
    kept_keys, kept_values = cache.layers[0].keys, cache.layers[0].values
    assert torch.equal(kept_keys[:, :, :6], keys[[0, 2]])
    assert torch.equal(kept_values[:, :, :6], -keys[[0, 2]])
    assert (cache.get_seq_length(), cache.capacity) == (7, 12)


def _filled(rows: int, length: int, start: float) -> GrowingCache:
    cache = GrowingCache()
    keys = torch.arange(rows * length, dtype=torch.float32).view(rows, 1, length, 1) + start
    cache.update(keys, -keys, 0)
    return cache


def test_joining_batches_left_pads_the_narrower_one_and_trimming_undoes_it() -> None:
    """The narrower batch's rows move right behind masked zero slots; once the wider rows
    leave, the all-padding slots are trimmed away and the real slots are unchanged."""
    wide, narrow = _filled(1, 5, 0.0), _filled(2, 3, 100.0)
    narrow_keys = narrow.layers[0].keys.clone()
    ones = torch.ones
    cache, mask = concat_left_padded(
        (wide, ones((1, 5), dtype=torch.long)), (narrow, ones((2, 3), dtype=torch.long))
    )
    assert mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]
    keys = cache.layers[0].keys
    assert torch.equal(keys[1:, :, :2], torch.zeros(2, 1, 2, 1))
    assert torch.equal(keys[1:, :, 2:], narrow_keys)
    cache.batch_select_indices(torch.tensor([1, 2]))
    trimmed, mask = trim_padding(cache, mask[[1, 2]])
    assert mask.tolist() == [[1, 1, 1], [1, 1, 1]]
    assert torch.equal(trimmed.layers[0].keys, narrow_keys)
    assert torch.equal(trimmed.layers[0].values, -narrow_keys)
