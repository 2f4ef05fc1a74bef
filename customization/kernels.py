"""Faster CPU kernels for the frozen base's biggest matrix products, at inference.

torch's ``nn.Linear`` on a CPU runs MKL's sgemm. For the few rows a decode step has (one
per running request) that is a poor fit: on the 2-core machines this project runs on, the
base's LM head (49,152 x 576) took 8.7 ms for one row and ~20 ms for two to eight, so a
batch of 8 paid most of its LM head twice over. oneDNN's matmul on a weight reordered once
into its own blocked layout takes 4.8 ms for one row and 7.4 ms for eight, and the MLP's
projections gain 20-35 % at two to thirty-two rows (``bench/serve_bench.py`` measures the
engine as a whole). Its result for a row is also the same whatever the other rows in the
call, which MKL's is not (it picks its kernel by the row count).

``prepack_linears`` points chosen frozen ``nn.Linear`` modules at that path. Only calls that
cannot need a gradient take it (grad mode off, or ``inference_mode``); CPU float32 only;
anything else, training included, runs ``nn.Linear``'s own forward. The reordered copy is
made on the first call that takes the path, so a process that never runs the base at
inference (a training node) never holds it, and is made again if the weight was changed in
place. It costs memory beside the weight it copies: for SmolLM2-135M's head and MLPs about
430 MB.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch


def prepacked_linear_available() -> bool:
    """Whether this torch build has oneDNN's prepacked linear (CPU builds with MKL-DNN)."""
    return bool(
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class _PrepackedForward:
    """The forward a prepacked ``nn.Linear`` runs: oneDNN on its reordered weight where no
    gradient can be asked for, the module's own forward otherwise."""

    def __init__(self, linear: torch.nn.Linear):
        self.own_forward: Callable[[torch.Tensor], torch.Tensor] = linear.forward
        self.weight = linear.weight
        self.bias = linear.bias
        self.packed: torch.Tensor | None = None
        self.packed_version = -1  # the weight's version counter when it was reordered

    def __deepcopy__(self, memo: dict[int, Any]) -> _PrepackedForward:
        """A copied module's forward: its own weight, reordered when first used (a copied
        layer is one to train, most often, which never takes this path)."""
        clone = _PrepackedForward.__new__(_PrepackedForward)
        clone.own_forward = copy.deepcopy(self.own_forward, memo)
        clone.weight = copy.deepcopy(self.weight, memo)
        clone.bias = copy.deepcopy(self.bias, memo)
        clone.packed, clone.packed_version = None, -1
        return clone

    def eligible(self, x: torch.Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and self.weight.device.type == "cpu"
            and (torch.is_inference_mode_enabled() or not torch.is_grad_enabled())
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.eligible(x):
            return self.own_forward(x)
        # An inference tensor keeps no version counter: reordered once.
        version = 0 if self.weight.is_inference() else self.weight._version
        if self.packed is None or self.packed_version != version:
            with torch.inference_mode():
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)
            self.packed_version = version
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x, self.packed, self.bias, "none", [], ""
        )
        return out


def prepack_linears(modules: Iterable[Any]) -> int:
    """Point each ``nn.Linear`` among ``modules`` at the prepacked path (a no-op where this
    torch has none); how many were.

    The module stays what it was (its weight, hooks, state dict and ``isinstance`` are
    untouched, so PEFT can still wrap it): only its instance's ``forward`` is replaced.
    """
    if not prepacked_linear_available():
        return 0
    count = 0
    for module in modules:
        if type(module) is torch.nn.Linear and not isinstance(module.forward, _PrepackedForward):
            setattr(module, "forward", _PrepackedForward(module))  # noqa: B010  # on the instance
            count += 1
    return count


def is_prepacked(module: Any) -> bool:
    return isinstance(getattr(module, "forward", None), _PrepackedForward)
