"""The base's prepacked linears compute what ``nn.Linear`` computes, whatever the batch."""

import copy

import pytest
import torch

from customization.base_model import FrozenBase
from customization.kernels import is_prepacked, prepack_linears, prepacked_linear_available


def _linear(seed: int = 0, bias: bool = True) -> torch.nn.Linear:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(64, 200, bias=bias)
    linear.requires_grad_(False)
    return linear


def test_the_pinned_torch_has_the_prepacked_linear() -> None:
    assert prepacked_linear_available()
    linear = _linear()
    assert prepack_linears([linear, torch.nn.LayerNorm(4)]) == 1  # Linear modules only
    assert prepack_linears([linear]) == 0  # once
    assert is_prepacked(linear)


@pytest.mark.parametrize("bias", [True, False])
@torch.inference_mode()
def test_a_prepacked_linear_equals_nn_linear_and_a_row_its_own_result_in_any_batch(
    bias: bool,
) -> None:
    linear = _linear(bias=bias)  # made in inference mode: its weight keeps no version
    prepack_linears([linear])
    x = torch.randn(33, 64, generator=torch.Generator().manual_seed(1))
    alone = linear(x[:1])
    for rows in (1, 2, 8, 33):
        out = linear(x[:rows])
        torch.testing.assert_close(
            out, torch.nn.functional.linear(x[:rows], linear.weight, linear.bias)
        )
        assert torch.equal(out[:1], alone)  # bit for bit, whatever the other rows
    three_d = linear(x[:6].view(2, 3, 64))
    assert three_d.shape == (2, 3, 200)
    assert torch.equal(three_d.view(6, 200)[:1], alone)
    last = x[:6].view(3, 2, 64)[:, -1]  # a strided view, as a decode step's last states are
    assert not last.is_contiguous()
    assert torch.equal(linear(last), linear(last.contiguous()))


def test_where_a_gradient_may_be_asked_for_it_runs_nn_linear_itself() -> None:
    linear = _linear()
    prepack_linears([linear])
    x = torch.randn(4, 64, requires_grad=True)
    out = linear(x)
    assert torch.equal(out, torch.nn.functional.linear(x, linear.weight, linear.bias))
    out.sum().backward()
    assert x.grad is not None
    assert linear.forward.packed is None  # nothing was reordered for it


def test_a_weight_changed_in_place_is_reordered_again() -> None:
    linear = _linear()
    prepack_linears([linear])
    x = torch.randn(3, 64)
    with torch.inference_mode():
        before = linear(x)
    with torch.no_grad():
        linear.weight.mul_(2)
    with torch.inference_mode():
        after = linear(x)
    torch.testing.assert_close(after, torch.nn.functional.linear(x, linear.weight, linear.bias))
    assert not torch.allclose(before, after)


def test_a_deep_copy_computes_with_its_own_weight() -> None:
    linear = _linear()
    prepack_linears([linear])
    x = torch.randn(3, 64)
    with torch.inference_mode():
        original = linear(x)
    clone = copy.deepcopy(linear)
    assert is_prepacked(clone)
    with torch.no_grad():
        clone.weight.zero_()
    with torch.inference_mode():
        assert torch.equal(clone(x), clone.bias.expand(3, -1))
        assert torch.equal(linear(x), original)


def test_a_frozen_base_prepacks_its_head_and_mlps_only(base: FrozenBase) -> None:
    assert is_prepacked(base.lm_head)
    for layer in base.model.get_decoder().layers:
        assert all(is_prepacked(m) for m in layer.mlp.modules() if isinstance(m, torch.nn.Linear))
        attention = [m for m in layer.self_attn.modules() if isinstance(m, torch.nn.Linear)]
        assert attention
        assert not any(is_prepacked(m) for m in attention)  # faster on MKL at one row
