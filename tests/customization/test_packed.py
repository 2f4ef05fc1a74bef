"""A packed forward (running rows' tokens and a joining chunk's as one sequence) computes
what each part's own forward computes."""

from typing import Any

import torch

from customization import packed
from customization.base_model import FrozenBase
from customization.kv_cache import GrowingCache
from customization.packed import Packed, Segment


def _forward(
    base: FrozenBase,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    cache: GrowingCache,
) -> Any:
    """The tokens' own forward into ``cache``, every layer's states recorded."""
    return base.backbone_forward(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        states=True,
    )


def _left_padded_positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(dim=1) - 1).clamp(min=0)


def _cached(base: FrozenBase, ids: torch.Tensor, mask: torch.Tensor) -> GrowingCache:
    """A cache holding ``ids`` (left-padded as ``mask`` says), from a forward of its own."""
    cache = GrowingCache()
    _forward(base, ids, mask, _left_padded_positions(mask), cache)
    return cache


@torch.inference_mode()
def test_a_packed_forward_equals_each_segments_own_forward(base: FrozenBase) -> None:
    """Two running rows (one left-padded) decoding a token each and a new two-row cohort
    (one left-padded) prefilling three columns: the packed forward gives every real token
    the states and cache entries its own forward gives (max abs diff < 1e-5), and padding
    stays finite."""
    packed.install(base.model)
    assert packed.installed(base.model)
    vocab = base.tokenizer.vocab_size
    generator = torch.Generator().manual_seed(0)
    running_ids = torch.randint(3, vocab, (2, 5), generator=generator)
    running_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    step_ids = torch.randint(3, vocab, (2, 1), generator=generator)
    step_positions = running_mask.sum(dim=1, keepdim=True)  # (2, 1): the next position
    step_mask = torch.cat([running_mask, torch.ones((2, 1), dtype=torch.long)], dim=1)
    cohort_ids = torch.randint(3, vocab, (2, 3), generator=generator)
    cohort_mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    cohort_positions = _left_padded_positions(cohort_mask)

    # Each part's own forward, into its own cache.
    alone_cache = _cached(base, running_ids, running_mask)
    alone_step = _forward(base, step_ids, step_mask, step_positions, alone_cache)
    alone_cohort_cache = GrowingCache()
    alone_cohort = _forward(base, cohort_ids, cohort_mask, cohort_positions, alone_cohort_cache)

    # Both in one packed forward.
    running_cache = _cached(base, running_ids, running_mask)
    cohort_cache = GrowingCache()
    plan = Packed(
        [
            Segment(step_ids, step_positions, step_mask, running_cache),
            Segment(cohort_ids, cohort_positions, cohort_mask, cohort_cache),
        ]
    )
    outputs = base.backbone_forward(states=True, **plan.inputs())
    step, cohort = plan.split(outputs)

    assert step.last_hidden_state.shape == alone_step.last_hidden_state.shape
    assert (step.last_hidden_state - alone_step.last_hidden_state).abs().max() < 1e-5
    for mine, theirs in zip(step.hidden_states, alone_step.hidden_states, strict=True):
        assert (mine - theirs).abs().max() < 1e-5
    real = cohort_mask.bool()
    for mine, theirs in zip(cohort.hidden_states, alone_cohort.hidden_states, strict=True):
        assert (mine[real] - theirs[real]).abs().max() < 1e-5
        assert torch.isfinite(mine).all()
    for (k, v), (k_alone, v_alone) in zip(
        running_cache.to_legacy_cache(), alone_cache.to_legacy_cache(), strict=True
    ):
        keep = step_mask.bool()
        assert (k.transpose(1, 2)[keep] - k_alone.transpose(1, 2)[keep]).abs().max() < 1e-5
        assert (v.transpose(1, 2)[keep] - v_alone.transpose(1, 2)[keep]).abs().max() < 1e-5
    for (k, v), (k_alone, v_alone) in zip(
        cohort_cache.to_legacy_cache(), alone_cohort_cache.to_legacy_cache(), strict=True
    ):
        assert (k.transpose(1, 2)[real] - k_alone.transpose(1, 2)[real]).abs().max() < 1e-5
        assert (v.transpose(1, 2)[real] - v_alone.transpose(1, 2)[real]).abs().max() < 1e-5


@torch.inference_mode()
def test_an_unpacked_forward_is_unchanged_by_the_switch(base: FrozenBase) -> None:
    """With the packed attention installed, a forward without segments is SDPA's, bit for
    bit, as before the switch (a padded one runs SDPA's grouped key/value heads)."""
    ids = torch.randint(3, base.tokenizer.vocab_size, (2, 6), generator=torch.Generator())
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    before_name = base.model.config._attn_implementation
    packed.install(base.model)
    after = base.backbone_forward(input_ids=ids, attention_mask=mask).last_hidden_state
    base.model.config._attn_implementation = "sdpa"
    try:
        reference = base.backbone_forward(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        base.model.config._attn_implementation = packed.ATTENTION
    assert before_name in ("sdpa", packed.ATTENTION)
    assert torch.equal(after, reference)


@torch.inference_mode()
def test_a_padded_decode_step_with_its_own_mask_equals_transformers_sdpa(
    base: FrozenBase,
) -> None:
    """A decode step of a left-padded batch, as the decoder runs it (the one-token mask
    built by ``one_token_mask``, SDPA's grouped key/value heads), gives bit for bit what
    transformers' SDPA gives with the 2-D mask (its own mask builder, each key/value head
    copied per query head)."""
    packed.install(base.model)
    vocab = base.tokenizer.vocab_size
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, vocab, (3, 5), generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    step_ids = torch.randint(3, vocab, (3, 1), generator=generator)
    step_positions = mask.sum(dim=1, keepdim=True)
    step_mask = torch.cat([mask, torch.ones((3, 1), dtype=torch.long)], dim=1)
    four_d = packed.one_token_mask(step_mask)
    assert four_d is not None
    assert four_d.shape == (3, 1, 1, 6)
    assert four_d.dtype == torch.bool
    assert packed.one_token_mask(torch.ones((2, 4), dtype=torch.long)) is None  # no padding

    ours = _forward(base, step_ids, four_d, step_positions, _cached(base, ids, mask))
    base.model.config._attn_implementation = "sdpa"
    try:
        theirs = _forward(base, step_ids, step_mask, step_positions, _cached(base, ids, mask))
    finally:
        base.model.config._attn_implementation = packed.ATTENTION
    for mine, reference in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        assert torch.equal(mine, reference)
