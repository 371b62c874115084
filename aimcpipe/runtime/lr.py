"""Learning-rate schedules, per epoch (the papers decay by 0.1 every 100 epochs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from aimcpipe.dataconf import check_fields
from aimcpipe.errors import ConfigError

__all__ = ["LRSchedule"]


@dataclass(frozen=True)
class LRSchedule:
    """``constant``, or ``step``: multiply by ``gamma`` every ``step_epochs`` epochs, or at
    each epoch listed in ``milestones`` (give exactly one of the two)."""

    kind: Literal["constant", "step"] = "constant"
    """``constant``: the learning rate never changes; ``step``: it is multiplied by
    ``gamma`` at steps given by ``step_epochs`` or ``milestones``."""
    step_epochs: int | None = None
    """``kind: step``: decay every this many epochs (>= 1)."""
    milestones: tuple[int, ...] = ()
    """``kind: step``: decay at each of these increasing epochs, counted from 0, so
    ``milestones: [100, 200]`` decays before the 101st and the 201st epoch, as arXiv
    2410.15155 does."""
    gamma: float = 0.1
    """The factor of each decay, in (0, 1]."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.kind == "step":
            if (self.step_epochs is None) == (not self.milestones):
                raise ConfigError(
                    "step_epochs: kind step needs exactly one of step_epochs or milestones"
                )
            if self.step_epochs is not None and self.step_epochs < 1:
                raise ConfigError(f"step_epochs: must be >= 1, got {self.step_epochs}")
            if any(m < 1 for m in self.milestones) or list(self.milestones) != sorted(
                set(self.milestones)
            ):
                raise ConfigError(
                    f"milestones: must be increasing epochs >= 1, got {list(self.milestones)}"
                )
        elif self.step_epochs is not None or self.milestones:
            raise ConfigError("kind: step_epochs/milestones need kind: step")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"gamma: must lie in (0, 1], got {self.gamma}")

    def lr_at(self, lr: float, epoch: int) -> float:
        """The learning rate of (0-based) ``epoch``."""
        if self.kind == "constant":
            return lr
        if self.step_epochs is not None:
            decays = epoch // self.step_epochs
        else:
            decays = sum(1 for m in self.milestones if epoch >= m)
        return lr * self.gamma**decays
