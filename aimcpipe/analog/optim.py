"""``AnalogSGD``: one step = explicit analog updates + digital SGD on the digital parameters.

Analog layers record ``(x, d)`` in backward; ``step`` hands them to each layer's update rule
(device response, Tiki-Taka ...). Every other parameter with a gradient (biases, norms,
digital layers) gets plain SGD, ``p −= lr·scale·p.grad``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from aimcpipe.analog.layers import AnalogLayer
from aimcpipe.errors import ConfigError

__all__ = ["AnalogSGD"]


class AnalogSGD:
    """Optimizer for a model that contains analog layers.

    ``step(scale=1/m)`` after ``m`` backward passes applies the mean of their updates: the
    analog layers concatenate the recorded samples (each sample's magnitude still counts in
    the asymmetric term) and the digital gradients, which autograd summed, are scaled.
    """

    def __init__(self, model: nn.Module, lr: float) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model: must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < math.inf:
            raise ConfigError(f"lr: must be a number > 0, got {lr!r}")
        self.model = model
        self.lr = lr
        self._analog = [m for m in model.modules() if isinstance(m, AnalogLayer)]
        anchors = {id(m.anchor) for m in self._analog}
        self._digital = [p for p in model.parameters() if id(p) not in anchors]

    @torch.no_grad()
    def step(self, lr: float | None = None, scale: float = 1.0) -> None:
        lr = self.lr if lr is None else lr
        for layer in self._analog:
            layer.analog.apply_pending(lr, scale)
        for p in self._digital:
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr * scale)

    def zero_grad(self) -> None:
        for p in self._digital:
            p.grad = None
        for layer in self._analog:
            layer.anchor.grad = None
