"""A shape group's batched decode step computes what each carry-on computes alone."""

from __future__ import annotations

import pytest
import torch

from customization.batched_carry_on import CarryOnGroup
from customization.carry_on import CarryOn, CarryOnCache
from customization.config import CarryOnConfig
from customization.training import build_carry_on
from tests.helpers.carry_on_kit import perturb

WIDTH = 24


def _carry_on(config: CarryOnConfig, seed: int, alpha: float) -> CarryOn:
    carry_on = perturb(build_carry_on(config, width=WIDTH, seed=seed), seed=seed + 100)
    carry_on.set_alpha(alpha)
    return carry_on


@pytest.mark.parametrize(
    ("config", "prompts"),
    [
        # the default ladder's layout: 7 rungs over 2 blocks, 4 then 3
        (CarryOnConfig(d_model=16, n_heads=2, taps=(-1, 1, 2, 3, 4, 5, 6, 7)), (5, 5, 5)),
        # one rung per block, rows at different lengths (a per-row causal mask)
        (CarryOnConfig(d_model=16, n_heads=2, n_blocks=3, taps=(-1, 1, 2)), (3, 7, 5)),
        # fewer rungs than blocks, and a mix over taps
        (CarryOnConfig(d_model=16, n_heads=2, n_blocks=3, taps=(-1, 2)), (4, 6)),
        (CarryOnConfig(d_model=16, n_heads=2, taps=(0, 1, -1), tap_mode="mix"), (2, 6, 4)),
    ],
    ids=["default-ladder", "ladder-uneven", "short-ladder", "mix"],
)
def test_a_group_step_equals_each_carry_on_alone(
    config: CarryOnConfig, prompts: tuple[int, ...]
) -> None:
    """Rows of one shape, at their own lengths, extended for three steps: every row's
    merged state matches its carry-on's own forward with its own cache."""
    generator = torch.Generator().manual_seed(0)
    carry_ons = [_carry_on(config, seed, alpha) for seed, alpha in enumerate((1.0, 0.5, 2.0))]
    carry_ons = carry_ons[: len(prompts)]
    n_taps = len(config.taps)
    group, caches = CarryOnGroup(), []
    with torch.inference_mode():
        for row, (carry_on, length) in enumerate(zip(carry_ons, prompts, strict=True)):
            taps = [torch.randn(1, length, WIDTH, generator=generator) for _ in range(n_taps)]
            cache = CarryOnCache()
            carry_on(taps, torch.randn(1, length, WIDTH, generator=generator), cache=cache)
            group.add(row, carry_on, CarryOnCache(list(cache.keys), list(cache.values)))
            caches.append(cache)
        for step in range(3):
            taps = [torch.randn(len(prompts), 1, WIDTH, generator=generator) for _ in range(n_taps)]
            final = torch.randn(len(prompts), 1, WIDTH, generator=generator)
            positions = torch.tensor([[length + step] for length in prompts])
            together = group.forward(taps, final, positions)
            for row, carry_on in enumerate(carry_ons):
                alone = carry_on(
                    [t[row : row + 1] for t in taps],
                    final[row : row + 1],
                    positions[row : row + 1],
                    caches[row],
                )
                torch.testing.assert_close(together[row : row + 1], alone, rtol=1e-5, atol=1e-5)
    assert group.lengths == [length + 3 for length in prompts]
