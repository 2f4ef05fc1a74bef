import pytest
import torch

from customization.base_model import FrozenBase
from customization.carry_on import CarryOn, CarryOnCache
from customization.config import CarryOnConfig
from tests.helpers.carry_on_kit import new_carry_on, perturb, tiny_config

SHAPES = [
    pytest.param(tiny_config(taps=(-1,), tap_mode="mix"), id="mix-final"),
    pytest.param(tiny_config(taps=(0, 1, -1), tap_mode="mix"), id="mix-intermediate"),
    pytest.param(tiny_config(taps=(1, -1), tap_mode="ladder"), id="ladder-intermediate"),
    pytest.param(tiny_config(taps=(0, 1, -1), tap_mode="ladder"), id="ladder-full"),
    pytest.param(
        tiny_config(taps=(-1, 0, 1, 2), n_blocks=2, tap_mode="ladder"), id="ladder-grouped"
    ),
]


def _batch(base: FrozenBase) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """All hidden states of a two-row batch and the base's own logits."""
    rows = [
        base.tokenizer.encode("A carry-on rides on the frozen base."),
        base.tokenizer.encode("It starts as an exact copy of the base!"),
    ]
    width = min(len(r) for r in rows)
    ids = torch.tensor([r[:width] for r in rows])
    states = base.hidden_states(ids, None, list(range(base.num_layers + 1)))
    return states, states[-1], base.logits(states[-1])


def _logits(base: FrozenBase, carry_on: CarryOn, states: list[torch.Tensor]) -> torch.Tensor:
    taps = [states[base.resolve_tap(t)] for t in carry_on.config.taps]
    with torch.no_grad():
        return base.logits(carry_on(taps, states[-1]))


@pytest.mark.parametrize("config", SHAPES)
def test_carry_on_at_initialisation_gives_the_base_logits(
    base: FrozenBase, config: CarryOnConfig
) -> None:
    """A fresh carry-on (zero up-projection) leaves the base's logits unchanged."""
    states, _, base_logits = _batch(base)
    carry_on = new_carry_on(base, config, seed=1)
    assert (_logits(base, carry_on, states) - base_logits).abs().max() < 1e-5


@pytest.mark.parametrize("config", SHAPES)
def test_alpha_zero_gives_the_base_logits_after_training_moved_the_weights(
    base: FrozenBase, config: CarryOnConfig
) -> None:
    """A carry-on away from its init changes the logits; with alpha = 0 they are the base's."""
    states, _, base_logits = _batch(base)
    carry_on = perturb(new_carry_on(base, config, seed=1), seed=2)
    assert (_logits(base, carry_on, states) - base_logits).abs().max() > 1e-2
    carry_on.set_alpha(0.0)
    assert (_logits(base, carry_on, states) - base_logits).abs().max() < 1e-5


@pytest.mark.parametrize(
    "taps",
    [pytest.param((0, 1, -1), id="one-per-block"), pytest.param((2, 0, 1, -1), id="grouped")],
)
def test_taps_change_the_output_through_each_of_their_projections(
    base: FrozenBase, taps: tuple[int, ...]
) -> None:
    """In a ladder every tap reaches the output (each projection gets a gradient)."""
    states, final, _ = _batch(base)
    carry_on = perturb(new_carry_on(base, tiny_config(taps=taps, tap_mode="ladder")), seed=3)
    carry_on([states[base.resolve_tap(t)] for t in taps], final).square().sum().backward()
    for projection in carry_on.tap_projections:
        assert projection.weight.grad is not None
        assert projection.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("config", SHAPES)
def test_cached_incremental_forward_equals_the_full_forward(
    base: FrozenBase, config: CarryOnConfig
) -> None:
    """Feeding a sequence in pieces through the carry-on's KV cache gives the same states."""
    states, final, _ = _batch(base)
    carry_on = perturb(new_carry_on(base, config), seed=4)
    taps = [states[base.resolve_tap(t)] for t in config.taps]
    with torch.no_grad():
        full = carry_on(taps, final)
        cache = CarryOnCache()
        pieces = [carry_on([t[:, :5] for t in taps], final[:, :5], cache=cache)]
        for position in range(5, final.shape[1]):
            step = slice(position, position + 1)
            pieces.append(carry_on([t[:, step] for t in taps], final[:, step], cache=cache))
    assert cache.length == final.shape[1]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-4)


def test_carry_on_is_causal(base: FrozenBase) -> None:
    """Changing a later position never changes the output at earlier positions."""
    _, final, _ = _batch(base)
    carry_on = perturb(new_carry_on(base, tiny_config()), seed=5)
    changed = final.clone()
    changed[:, 6:] += 1.0
    with torch.no_grad():
        before = carry_on([final], final)
        after = carry_on([changed], changed)
    assert torch.equal(before[:, :6], after[:, :6])
    assert not torch.equal(before[:, 6:], after[:, 6:])


def test_carry_on_needs_a_resolved_config() -> None:
    """Building a CarryOn from an unresolved config is a clear error."""
    with pytest.raises(ValueError, match="resolved"):
        CarryOn(CarryOnConfig())


def test_branch_refuses_the_wrong_number_of_taps(base: FrozenBase) -> None:
    """A carry-on built for two taps refuses one."""
    _, final, _ = _batch(base)
    carry_on = new_carry_on(base, tiny_config(taps=(1, -1)))
    with pytest.raises(ValueError, match="expected 2 taps, got 1"):
        carry_on([final], final)


def test_default_is_a_two_block_ladder_of_about_two_megabytes_in_fp16_on_smollm2() -> None:
    """The default: 2 blocks, 128 wide, a ladder over 8 taps; ~2 MB in fp16 on a 576-wide base."""
    config = CarryOnConfig()
    assert (config.n_blocks, config.d_model, config.tap_mode, len(config.taps)) == (
        2,
        128,
        "ladder",
        8,
    )
    assert config.taps[0] == -1  # the stream starts from the base's final state
    carry_on = CarryOn(config.resolved(tap_sizes=(576,) * 8, hidden_size=576))
    assert 1.0e6 < carry_on.artifact_nbytes(bytes_per_value=2) < 2.5e6


def test_grouped_ladder_adds_each_tap_before_its_own_block(base: FrozenBase) -> None:
    """With more taps than blocks, a tap of the last group leaves the first block's input alone."""
    states, final, _ = _batch(base)
    config = tiny_config(taps=(-1, 0, 1, 2), n_blocks=2, tap_mode="ladder")  # groups (0, 1), (2)
    assert config.ladder_blocks == (0, 0, 1)
    carry_on = perturb(new_carry_on(base, config), seed=6)
    seen: list[torch.Tensor] = []
    hook = carry_on.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    taps = [states[base.resolve_tap(t)] for t in config.taps]
    changed = [*taps[:3], taps[3] + 1.0]
    with torch.no_grad():
        first, second = carry_on(taps, final), carry_on(changed, final)
    hook.remove()
    torch.testing.assert_close(seen[0], seen[1])
    assert not torch.equal(first, second)
