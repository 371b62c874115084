"""Turn a torch model's ``nn.Linear`` / ``nn.Conv2d`` layers into analog ones."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from aimcpipe.analog.config import AnalogConfig
from aimcpipe.analog.layers import AnalogConv2d, AnalogLayer, AnalogLinear
from aimcpipe.dataconf import check_int
from aimcpipe.errors import ConfigError
from aimcpipe.seeding import derive_seed

__all__ = ["analog_layers", "convert"]


def _analog_copy(name: str, layer: nn.Module, config: AnalogConfig, seed: int) -> AnalogLayer:
    layer_seed = derive_seed(seed, name)
    weight = layer.weight.detach()
    kwargs = dict(config=config, seed=layer_seed, device=weight.device, dtype=weight.dtype)
    if isinstance(layer, nn.Linear):
        new: AnalogLayer = AnalogLinear(
            layer.in_features, layer.out_features, layer.bias is not None, **kwargs
        )
        new.analog.set_weight(weight)
    else:
        if layer.groups != 1:
            raise ConfigError(
                f"{name}: grouped convolution (groups={layer.groups}) is not supported by "
                "AnalogConv2d; exclude the layer or use groups=1"
            )
        if layer.padding_mode != "zeros":
            raise ConfigError(
                f"{name}: padding_mode={layer.padding_mode!r} is not supported; use 'zeros'"
            )
        try:
            new = AnalogConv2d(
                layer.in_channels,
                layer.out_channels,
                layer.kernel_size,
                layer.stride,
                layer.padding,
                layer.dilation,
                layer.bias is not None,
                **kwargs,
            )
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from None
        new.analog.set_weight(weight.reshape(layer.out_channels, -1))
    if layer.bias is not None:
        with torch.no_grad():
            new.bias.copy_(layer.bias)
    new.train(layer.training)
    return new


def convert(
    model: nn.Module,
    config: AnalogConfig | None = None,
    *,
    seed: int = 0,
    exclude: Iterable[str] = (),
    inplace: bool = False,
) -> nn.Module:
    """Replace every ``nn.Linear`` and ``nn.Conv2d`` (except those whose qualified names are in
    ``exclude``) by an analog layer programmed with the same weights (clipped to the device
    bounds). Each layer's seed is derived from ``seed`` and its qualified name, so a layer's
    random streams do not depend on how the model is later split into stages."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    config = AnalogConfig() if config is None else config
    if not isinstance(config, AnalogConfig):
        raise ConfigError(f"config: expected an AnalogConfig or None, got {config!r}")
    check_int("seed", seed, 0)
    if isinstance(exclude, str):
        raise ConfigError(f"exclude: expected a list of layer names, got the string {exclude!r}")
    excluded = set(exclude)
    known = {name for name, _ in model.named_modules()}
    missing = sorted(excluded - known)
    if missing:
        raise ConfigError(f"exclude: no layer named {missing[0]!r} in the model")
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, nn.Linear | nn.Conv2d):
        return _analog_copy("", model, config, seed)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention):
            continue  # reads its projections' weights directly: it cannot use analog layers
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if full in excluded or not isinstance(child, nn.Linear | nn.Conv2d):
                continue
            setattr(module, child_name, _analog_copy(full, child, config, seed))
    return model


def analog_layers(model: nn.Module) -> list[AnalogLayer]:
    """All analog layers of ``model`` in module order."""
    return [m for m in model.modules() if isinstance(m, AnalogLayer)]
