"""The blocks of a model to be pipelined.

A pipeline stage holds a contiguous run of *blocks*. A model exposes its blocks in one of two
ways: it is an ``nn.Sequential`` (its children are the blocks), or it has an attribute
``blocks`` that is an ``nn.Sequential`` or ``nn.ModuleList`` whose entries, applied in order,
compute the model's forward. Block names are qualified module names in the whole model
(``"fc1"``, ``"blocks.0"``), so the state_dict keys of a stage built from them merge back into
the whole model's state_dict.
"""

from __future__ import annotations

from torch import nn

from aimcpipe.errors import ConfigError

__all__ = ["pipeline_blocks"]


def pipeline_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every block of ``model``, in forward order.

    An ``nn.Sequential`` model (subclasses included) is split into its children even if it
    also has a ``blocks`` attribute, because its forward is defined by its children."""
    kind = type(model).__name__
    if isinstance(model, nn.Sequential):
        blocks = list(model.named_children())
    else:
        container = getattr(model, "blocks", None)
        if container is None:
            raise ConfigError(
                f"model: {kind} is not an nn.Sequential and has no 'blocks' list; wrap its "
                "layers in nn.Sequential or give it a 'blocks' nn.ModuleList/nn.Sequential"
            )
        if not isinstance(container, nn.Sequential | nn.ModuleList):
            raise ConfigError(
                f"model: {kind}.blocks is a {type(container).__name__}, not an "
                "nn.ModuleList/nn.Sequential; store the blocks in one so their parameters are "
                "registered and named"
            )
        blocks = [(f"blocks.{name}", module) for name, module in container.named_children()]
    if not blocks:
        raise ConfigError(f"model: {kind} has an empty block list; a pipeline needs >= 1 block")
    return blocks
