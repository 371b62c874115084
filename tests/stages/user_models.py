"""User model factories imported by path in the zoo tests (``tests.stages.user_models:build``)."""

from collections import OrderedDict

import torch
from torch import nn


def build(hidden: int = 16) -> nn.Sequential:
    """A two-block MLP for 8 inputs, as a user would write one."""
    return nn.Sequential(
        OrderedDict(
            hidden=nn.Sequential(nn.Linear(8, hidden), nn.ReLU()),
            out=nn.Linear(hidden, 2),
        )
    )


def not_a_module(hidden: int = 16) -> object:
    return {"hidden": hidden}


def needs_width(width: int) -> nn.Linear:
    return nn.Linear(width, width)


def draws_from_global_rng() -> nn.Linear:
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.add_(torch.rand(4, 4))
    return layer


NOT_CALLABLE = 3
