"""pipeline_blocks: what counts as a block list and how blocks are named."""

import pytest
import torch
from torch import nn

from aimcpipe.errors import ConfigError
from aimcpipe.stages import pipeline_blocks


class WithBlocks(nn.Module):
    def __init__(self, container: nn.Module) -> None:
        super().__init__()
        self.blocks = container

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_sequential_children_are_blocks_named_as_in_the_model():
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(3, 4))
    model.add_module("act", nn.ReLU())
    model.add_module("fc2", nn.Linear(4, 2))
    blocks = pipeline_blocks(model)
    assert [name for name, _ in blocks] == ["fc1", "act", "fc2"]
    assert blocks[0][1] is model.fc1


@pytest.mark.parametrize("container", [nn.ModuleList, lambda layers: nn.Sequential(*layers)])
def test_blocks_attribute_gives_qualified_names_that_match_the_state_dict(container):
    model = WithBlocks(container([nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1)]))
    blocks = pipeline_blocks(model)
    assert [name for name, _ in blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    merged = {f"{name}.{key}": v for name, m in blocks for key, v in m.state_dict().items()}
    assert merged.keys() == model.state_dict().keys()
    x = torch.randn(2, 3)
    y = x
    for _, block in blocks:
        y = block(y)
    torch.testing.assert_close(y, model(x))


def test_model_without_blocks_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as info:
        pipeline_blocks(nn.Linear(2, 2))
    message = str(info.value)
    assert "\n" not in message
    assert "Linear is not an nn.Sequential" in message
    assert "'blocks'" in message and "nn.ModuleList" in message


def test_blocks_attribute_that_is_not_a_module_container_is_refused():
    model = WithBlocks(nn.Linear(2, 2))
    del model.blocks
    model.blocks = [nn.Linear(2, 2)]  # a plain list: parameters would not be registered
    with pytest.raises(ConfigError, match=r"WithBlocks\.blocks is a list"):
        pipeline_blocks(model)


@pytest.mark.parametrize("model", [nn.Sequential(), WithBlocks(nn.ModuleList())])
def test_empty_block_list_is_refused(model):
    with pytest.raises(ConfigError, match="empty block list"):
        pipeline_blocks(model)
