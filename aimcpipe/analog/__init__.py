"""Simulated analog in-memory computing: devices, tiles, update rules and layers.

This package knows nothing of pipelines (docs/design.md §2).
"""

from aimcpipe.analog.config import (
    AnalogConfig,
    DeviceConfig,
    IOConfig,
    TikiTakaConfig,
    UpdateConfig,
    io_preset,
)
from aimcpipe.analog.convert import analog_layers, convert
from aimcpipe.analog.layers import AnalogConv2d, AnalogLayer, AnalogLinear
from aimcpipe.analog.optim import AnalogSGD
from aimcpipe.analog.rules import AnalogWeight, SingleTileWeight, TikiTakaWeight, build_weight
from aimcpipe.analog.tile import AnalogTile

__all__ = [
    "AnalogConfig",
    "AnalogConv2d",
    "AnalogLayer",
    "AnalogLinear",
    "AnalogSGD",
    "AnalogTile",
    "AnalogWeight",
    "DeviceConfig",
    "IOConfig",
    "SingleTileWeight",
    "TikiTakaConfig",
    "TikiTakaWeight",
    "UpdateConfig",
    "analog_layers",
    "build_weight",
    "convert",
    "io_preset",
]
