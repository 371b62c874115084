"""Analog layers: ``AnalogLinear`` and ``AnalogConv2d``.

The autograd function saves the layer *input* and, in backward, reads the array as it is
*now* (the transposed MVM runs on the current conductances, as on real AIMC hardware). It
does not produce a weight gradient: it records ``(x, d)`` on the layer's ``AnalogWeight``,
and the update is applied explicitly later (``AnalogSGD.step`` or a pipeline stage's ``U``
action). An update between a forward and its backward is therefore legal and visible to the
backward (docs/design.md §3).

Biases stay digital ``nn.Parameter``s, trained with digital SGD.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aimcpipe.analog.config import AnalogConfig
from aimcpipe.analog.rules import AnalogWeight, build_weight
from aimcpipe.dataconf import check_int
from aimcpipe.errors import ConfigError
from aimcpipe.seeding import derive_seed

__all__ = ["AnalogConv2d", "AnalogLayer", "AnalogLinear"]


class _AnalogMVM(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, anchor: torch.Tensor, weight: AnalogWeight) -> Any:
        ctx.weight = weight
        ctx.save_for_backward(x)
        return weight(x)

    @staticmethod
    def backward(ctx: Any, d: torch.Tensor) -> Any:
        (x,) = ctx.saved_tensors
        weight: AnalogWeight = ctx.weight
        weight.record(x, d)
        grad_x = weight.transposed(d).to(x.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


class AnalogLayer(nn.Module):
    """Common part of the analog layers: the ``AnalogWeight`` (``self.analog``), a digital
    bias, and a zero-size parameter that makes autograd call backward even when the input
    does not require a gradient (first layer)."""

    def __init__(
        self,
        out_features: int,
        in_features: int,
        bias: bool,
        config: AnalogConfig | None,
        seed: int,
        device: torch.device | str | None,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        check_int("in_features", in_features, 1)
        check_int("out_features", out_features, 1)
        if config is not None and not isinstance(config, AnalogConfig):
            raise ConfigError(
                f"config: must be an AnalogConfig or None, got {type(config).__name__} "
                "(AnalogConfig(...) or AnalogConfig.from_dict({...}) makes one)"
            )
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ConfigError(f"dtype: must be a floating-point torch dtype, got {dtype!r}")
        self.config = config or AnalogConfig()
        self.analog = build_weight(
            self.config, out_features, in_features, seed, device=device, dtype=dtype
        )
        self.bias = (
            nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        )
        self.anchor = nn.Parameter(torch.zeros(0, device=device, dtype=dtype))

    def _mvm(self, x2d: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return _AnalogMVM.apply(x2d, self.anchor, self.analog)
        return self.analog(x2d)

    @torch.no_grad()
    def _init_weights(self, seed: int) -> None:
        """torch's default Linear/Conv init, U(±1/√fan_in), drawn from ``seed`` (weights
        clipped to the device bounds when programmed)."""
        out_features, fan_in = self.analog.out_features, self.analog.in_features
        bound = 1.0 / math.sqrt(fan_in)
        generator = torch.Generator().manual_seed(derive_seed(seed, "init"))
        weight = torch.empty(out_features, fan_in).uniform_(-bound, bound, generator=generator)
        self.analog.set_weight(weight.to(self.analog.effective_weight()))
        if self.bias is not None:
            bias = torch.empty(out_features).uniform_(-bound, bound, generator=generator)
            self.bias.copy_(bias)

    @property
    def pending(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.analog.pending


class AnalogLinear(AnalogLayer):
    """Drop-in for ``nn.Linear`` whose weight lives on an analog tile."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        config: AnalogConfig | None = None,
        *,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(out_features, in_features, bias, config, seed, device, dtype)
        self.in_features = in_features
        self.out_features = out_features
        self._init_weights(seed)

    @property
    def weight(self) -> torch.Tensor:
        """The effective (read-only) weight, ``out × in``."""
        return self.analog.effective_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self._mvm(x.reshape(-1, self.in_features))
        y = y.reshape(*shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, rule={self.config.rule}"
        )


def _pair(v: int | tuple[int, int], name: str = "size", minimum: int = 0) -> tuple[int, int]:
    """``v`` as a pair of integers >= ``minimum`` (one-line ConfigError naming ``name``)."""
    pair = (v, v) if isinstance(v, int) else tuple(v) if isinstance(v, tuple | list) else ()
    if len(pair) != 2 or not all(
        isinstance(p, int) and not isinstance(p, bool) and p >= minimum for p in pair
    ):
        raise ConfigError(f"{name}: must be an integer >= {minimum} or a pair of them, got {v!r}")
    return (int(pair[0]), int(pair[1]))


class AnalogConv2d(AnalogLayer):
    """Drop-in for ``nn.Conv2d`` (groups = 1): the input is unfolded into patches, each patch
    is one MVM row, and the update uses the patches as inputs (every patch counts as a sample
    in the asymmetric term and in pulse trains, as on hardware)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        config: AnalogConfig | None = None,
        *,
        seed: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        check_int("in_channels", in_channels, 1)
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        if padding == "valid":
            padding = 0
        elif isinstance(padding, str):
            raise ConfigError(
                f"padding: {padding!r} is not supported by AnalogConv2d; use integers or 'valid'"
            )
        fan_in = in_channels * self.kernel_size[0] * self.kernel_size[1]
        super().__init__(out_channels, fan_in, bias, config, seed, device, dtype)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        self.dilation = _pair(dilation, "dilation", 1)
        self._init_weights(seed)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight as ``out × in × kh × kw``."""
        return self.analog.effective_weight().reshape(
            self.out_channels, self.in_channels, *self.kernel_size
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        patches = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        locations = patches.shape[-1]
        rows = patches.transpose(1, 2).reshape(batch * locations, -1)
        y = self._mvm(rows)
        out_h = (
            height + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1
        ) // self.stride[0] + 1
        out_w = (
            width + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1
        ) // self.stride[1] + 1
        y = y.reshape(batch, locations, self.out_channels).transpose(1, 2)
        y = y.reshape(batch, self.out_channels, out_h, out_w)
        return y + self.bias.view(1, -1, 1, 1) if self.bias is not None else y

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, rule={self.config.rule}"
        )
