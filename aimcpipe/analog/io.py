"""Analog matrix-vector multiplication with IO non-idealities (docs/design.md §3).

The same function serves the forward pass (``y = W x``) and the backward pass
(``g = Wᵀ d``, the transposed read of the same array), each with its own ``IOConfig``.
"""

from __future__ import annotations

import torch

from aimcpipe.analog.config import IOConfig

__all__ = ["analog_mvm"]


def _quantise(t: torch.Tensor, step: float) -> torch.Tensor:
    return t.div_(step).round_().mul_(step)


def analog_mvm(
    weight: torch.Tensor,
    inputs: torch.Tensor,
    io: IOConfig,
    generator: torch.Generator,
    *,
    transposed: bool = False,
) -> torch.Tensor:
    """Rows of ``inputs`` (b × in) through the array: ``inputs @ Wᵀ`` (or ``inputs @ W`` when
    ``transposed``), with noise management, input/output quantisation, output noise and
    output clipping applied per row as ``IOConfig`` describes."""
    matrix = weight if transposed else weight.t()
    if io.is_ideal:
        return inputs.mm(matrix)
    x = inputs
    scale = None
    if io.noise_management == "abs-max":
        scale = x.abs().amax(dim=1, keepdim=True)
        x = x / scale.clamp(min=torch.finfo(x.dtype).tiny)
    if io.inp_bound > 0:
        x = x.clamp(-io.inp_bound, io.inp_bound)
    if io.inp_res > 0:
        x = x.clone() if x is inputs else x
        x = _quantise(x, io.inp_res * 2 * io.inp_bound)
    y = x.mm(matrix)
    if io.out_noise > 0:
        noise = torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        y.add_(noise.mul_(io.out_noise))
    if io.out_bound > 0:
        y.clamp_(-io.out_bound, io.out_bound)
        if io.out_res > 0:
            y = _quantise(y, io.out_res * 2 * io.out_bound)
    if scale is not None:
        y.mul_(scale)
    return y
