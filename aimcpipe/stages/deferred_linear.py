"""Digital ``nn.Linear`` layers whose weight gradient waits for the update.

In a stage, a digital linear layer's backward ``B(n)`` computes only what the stage upstream
needs, the input gradient ``d·W``, and keeps the pair ``(x, d)`` (its input and the gradient
at its output) in the stage's pending update stash, as an analog layer does. ``U(ns)`` then
forms the weight gradient of all the micro-batches it applies as one matrix product
``Dᵀ·X`` over their rows (bias: the column sums of ``D``), instead of one small product and
one read-modify-write of a gradient buffer per micro-batch. The weights are the same (the
same sum, in another order: equal up to float rounding), and

* the backward that the previous stage waits for is shorter (on the benchmark MLP's stages,
  about half as long), so a pipeline's stages wait less for each other;
* a stage does less work in all: the one product over a whole mini-batch's rows reads and
  writes the gradient once (measured about 10 % less compute per stage for the benchmark's
  512-wide layers on one core).

The price is memory: ``(x, d)`` of every micro-batch stays until its update, ``rows ×
(in + out)`` numbers per micro-batch where the gradient buffer was ``in × out`` per layer —
the same trade an analog layer makes. A stage's ``peak_stash_bytes`` counts it.

A stage swaps each plain ``nn.Linear`` (the exact type; subclasses may do more) in its blocks
for a :class:`DeferredLinear` on a *shallow copy* of the modules above it: the copy shares
the layer's parameters and buffers, so training still changes the user's model in place, and
the user's own modules are left as they were.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DeferredLinear", "apply_pending", "defer_linear_gradients"]


class _LinearKeepingPairs(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        layer: DeferredLinear,
    ) -> torch.Tensor:
        ctx.layer = layer
        ctx.weight = weight  # read in backward as it is then (weight stashing swaps values in)
        ctx.save_for_backward(x)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, d: torch.Tensor) -> Any:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        ctx.layer.pending.append((x, d))
        grad_x = d.matmul(ctx.weight) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class DeferredLinear(nn.Linear):
    """An ``nn.Linear`` whose backward records ``(x, d)`` in ``pending`` instead of adding a
    weight gradient (outside autograd, or with a frozen weight, it is a plain linear)."""

    pending: list[tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def sharing(cls, layer: nn.Linear) -> DeferredLinear:
        """A DeferredLinear on ``layer``'s parameters, buffers and hooks (``layer`` is left
        as it was)."""
        new = copy.copy(layer)
        new.__class__ = cls
        new.pending = []
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return F.linear(x, weight, self.bias)
        return _LinearKeepingPairs.apply(x, weight, self.bias, self)


def defer_linear_gradients(
    blocks: Sequence[nn.Module],
) -> tuple[list[nn.Module], list[DeferredLinear]]:
    """``blocks`` with every plain ``nn.Linear`` inside (the exact type: analog layers
    and other subclasses are not) swapped for a :class:`DeferredLinear`, and the layers
    swapped in, in module order. Only the modules on a path to a swapped layer are copied
    (shallowly); a block without one is returned as it is. A layer used twice is swapped once."""
    swapped: dict[int, nn.Module] = {}
    layers: list[DeferredLinear] = []

    def swap(module: nn.Module) -> nn.Module:
        key = id(module)
        if key in swapped:
            return swapped[key]
        out = module
        if type(module) is nn.Linear:
            out = DeferredLinear.sharing(module)
            layers.append(out)
        else:
            children = {name: swap(child) for name, child in module.named_children()}
            changed = {n: c for n, c in children.items() if c is not module._modules[n]}
            if changed:
                out = copy.copy(module)
                out._modules = dict(module._modules)
                out._modules.update(changed)
        swapped[key] = out
        return out

    return [swap(block) for block in blocks], layers


@torch.no_grad()
def apply_pending(
    layer: nn.Linear, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], alpha: float
) -> None:
    """``W += alpha · Σ dᵀx`` and ``b += alpha · Σ d`` over ``pairs``, as one product."""
    if not pairs:
        return
    n_in, n_out = layer.in_features, layer.out_features
    if len(pairs) == 1:
        x, d = pairs[0][0].reshape(-1, n_in), pairs[0][1].reshape(-1, n_out)
    else:
        x = torch.cat([x.reshape(-1, n_in) for x, _ in pairs])
        d = torch.cat([d.reshape(-1, n_out) for _, d in pairs])
    layer.weight.data.addmm_(d.t(), x, alpha=alpha)
    if layer.bias is not None:
        layer.bias.data.add_(d.sum(dim=0), alpha=alpha)
