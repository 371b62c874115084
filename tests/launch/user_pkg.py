"""A user model factory trained from the CLI by import path (``tests.launch.user_pkg:build``)."""

from collections import OrderedDict

from torch import nn


def build(hidden: int = 32, num_classes: int = 10) -> nn.Sequential:
    """A two-block MLP for scikit-learn's 1×8×8 digits, written as a user would: the first
    block flattens the image, so each block is a pipeline stage candidate."""
    return nn.Sequential(
        OrderedDict(
            hidden=nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.Tanh()),
            out=nn.Linear(hidden, num_classes),
        )
    )
