"""What each stage of a :class:`~aimcpipe.runtime.Pipeline` is built from.

A :class:`StageBuilder` holds the model's pipeline blocks as a partition cut them and the
loss of the last stage (by name or callable; chosen from the data's task when not given).
From them it makes the :class:`~aimcpipe.runtime.plan.StageSpec` list the workers are built
from, or builds a :class:`~aimcpipe.stages.Stage` here: to check that the model takes the
data (:meth:`StageBuilder.check_takes`), and for the state of a pipeline whose workers have
not started.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from aimcpipe.errors import ConfigError, UserCodeError, describe_exception
from aimcpipe.runtime.datasets import Dataset
from aimcpipe.runtime.losses import resolve_loss
from aimcpipe.runtime.plan import StageSpec
from aimcpipe.stages.stage import LossFn, Stage

__all__ = ["StageBuilder"]


def _shape(x: Any) -> str:
    """A tensor's shape, or what the model gave instead (a tuple, a dict, ...)."""
    if isinstance(x, torch.Tensor):
        return str(tuple(x.shape))
    return f"a {type(x).__name__}, not a tensor"


class StageBuilder:
    """Stage ``s`` holds ``blocks[bounds[s]:bounds[s + 1]]``; ``loss``: the last stage's
    (None until :meth:`pick_loss`)."""

    def __init__(
        self,
        blocks: Sequence[tuple[str, nn.Module]],
        bounds: Sequence[int],
        loss: str | LossFn | None,
    ) -> None:
        self._blocks = list(blocks)
        self._bounds = tuple(bounds)
        self.loss = loss

    @property
    def num_stages(self) -> int:
        return len(self._bounds) - 1

    def blocks(self, s: int) -> list[tuple[str, nn.Module]]:
        """Stage ``s``'s blocks, ``(qualified name, module)`` pairs (a new list each time)."""
        lo, hi = self._bounds[s], self._bounds[s + 1]
        return [self._blocks[i] for i in range(lo, hi)]

    def all_blocks(self) -> list[list[tuple[str, nn.Module]]]:
        return [self.blocks(s) for s in range(self.num_stages)]

    def pick_loss(self, data: Dataset) -> None:
        if self.loss is None:
            self.loss = "cross-entropy" if data.task == "classification" else "mse"

    def local_stage(self, s: int, *, lr: float, seed: int, copy_blocks: bool = False) -> Stage:
        """Stage ``s`` built here on the blocks, or on copies of them (for checks and the
        state of an unstarted pipeline; the loss only matters once data is known)."""
        num = self.num_stages
        loss = resolve_loss(self.loss or "mse") if s == num - 1 else None
        blocks = copy.deepcopy(self.blocks(s)) if copy_blocks else self.blocks(s)
        return Stage(s, num, blocks, lr=lr, loss_fn=loss, seed=seed)

    def check_state(self, s: int, state: dict[str, Any], *, lr: float, seed: int) -> None:
        """Load ``state`` into a copy of stage ``s`` (the blocks themselves are untouched):
        a damaged checkpoint entry fails here with one line, before anything changes."""
        try:
            self.local_stage(s, lr=lr, seed=seed, copy_blocks=True).load_state_dict(state)
        except Exception as exc:
            raise ConfigError(
                f"checkpoint: stage {s}'s state is damaged ({describe_exception(exc)})"
            ) from exc

    def initial_states(self, *, lr: float, seed: int) -> list[dict[str, Any]]:
        """Every stage's state as built: the blocks, with each stage's initial random state."""
        return [self.local_stage(s, lr=lr, seed=seed).state_dict() for s in range(self.num_stages)]

    def specs(self, *, lr: float, seed: int, weight_stashing: bool) -> list[StageSpec]:
        """What each stage worker is built from (the loss must be chosen)."""
        num = self.num_stages
        return [
            StageSpec(
                index=s,
                num_stages=num,
                blocks=self.blocks(s),
                lr=lr,
                loss=self.loss if s == num - 1 else None,
                seed=seed,
                weight_stashing=weight_stashing,
            )
            for s in range(num)
        ]

    def check_takes(self, data: Dataset, *, lr: float, seed: int, count: int) -> None:
        """Run the first ``count`` samples of ``data`` through every stage built here (on
        evaluation streams) and the loss (chosen from ``data`` if not yet): a model that does
        not fit the data fails with one line naming the stage."""
        self.pick_loss(data)
        assert self.loss is not None
        x = data.x[:count]
        t = data.y[:count]
        for s in range(self.num_stages):
            stage = self.local_stage(s, lr=lr, seed=seed)
            with stage.evaluation(-1):
                try:
                    x = stage.infer(x)
                except Exception as exc:  # kept as the cause: --debug shows where it began
                    raise UserCodeError(
                        f"model: stage {s} ({', '.join(stage.names)}) cannot take "
                        f"the data (input {_shape(x)} from {data.name}): "
                        f"{describe_exception(exc)}"
                    ) from exc
            if not isinstance(x, torch.Tensor):
                raise ConfigError(
                    f"model: stage {s} ({', '.join(stage.names)}) returns {_shape(x)}; "
                    "every stage must return one tensor (what travels to the next stage or "
                    "the loss)"
                )
        try:
            with torch.no_grad():
                value = resolve_loss(self.loss)(x, t)
        except Exception as exc:
            raise UserCodeError(
                f"model: its output {_shape(x)} does not fit the {data.task} targets "
                f"{tuple(t.shape)} of {data.name}: {describe_exception(exc)}"
            ) from exc
        scalar = isinstance(value, torch.Tensor) and value.numel() == 1
        if not (scalar and value.is_floating_point()):
            what = (
                f"a tensor of shape {tuple(value.shape)}"
                if isinstance(value, torch.Tensor)
                else (f"a {type(value).__name__}")
            )
            raise ConfigError(f"loss: returned {what}; a loss returns a float scalar tensor "
                              "(the mean over the micro-batch)")  # fmt: skip
