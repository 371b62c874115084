"""What the central scheduler sends its stage workers, and what they send back.

Everything that must agree across processes is decided once on the scheduler and travels in
these plain records (they pickle): the stage's blocks and loss (:class:`StageSpec`), an
epoch's lr, sample order and schedule shape (:class:`EpochPlan`), an evaluation pass
(:class:`EvalPlan`). A worker builds its own action list from the plan (the scheduler package
is pure data), so no schedule travels, and it never reads another process's clock or random
state. What comes back is a :class:`StageReport` per epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from aimcpipe.runtime.interpreter import ActionRecord
from aimcpipe.scheduler import CostModel, Schedule, build_schedule
from aimcpipe.stages.stage import LossFn, StageCounters

__all__ = ["EpochPlan", "EvalPlan", "EvalResult", "StageReport", "StageSpec", "shifted"]


@dataclass
class StageSpec:
    """Stage ``index`` of ``num_stages``: its blocks (``(qualified name, module)`` pairs),
    and what its :class:`~aimcpipe.stages.Stage` needs. ``loss`` (last stage only) is a name
    from :data:`aimcpipe.runtime.LOSSES` or a picklable callable."""

    index: int
    num_stages: int
    blocks: list[tuple[str, nn.Module]]
    lr: float
    loss: str | LossFn | None
    seed: int
    weight_stashing: bool = False


@dataclass(frozen=True)
class EpochPlan:
    """One epoch's schedule: ``minibatches`` (K) mini-batches of ``microbatches`` (Bm)
    micro-batches of ``microbatch_size`` samples, taken from dataset ``data`` in ``order``
    (sent only to the stages that read data: the first and the last). ``action_s`` /
    ``latency_s`` are the emulated device time (0: none)."""

    epoch: int
    lr: float
    policy: str
    num_stages: int
    microbatches: int
    minibatches: int
    microbatch_size: int
    weight_stashing: bool
    data: str
    order: torch.Tensor | None
    costs: CostModel
    cycle_s: float | None
    timeout_s: float

    def schedule(self) -> Schedule:
        return cached_schedule(
            self.policy, self.num_stages, self.microbatches, self.minibatches, self.weight_stashing
        )

    def for_stage(self, s: int) -> EpochPlan:
        """The plan as stage ``s`` needs it (the sample order only where data is read)."""
        if s in (0, self.num_stages - 1) or self.order is None:
            return self
        return EpochPlan(**{**self.__dict__, "order": None})


@lru_cache(maxsize=16)
def cached_schedule(
    policy: str, num_stages: int, microbatches: int, minibatches: int, weight_stashing: bool
) -> Schedule:
    """The built-in schedule, built once per process for every epoch of the same shape
    (schedules are immutable)."""
    options = {"weight_stashing": True} if weight_stashing else {}
    return build_schedule(policy, num_stages, microbatches, minibatches, **options)


@dataclass(frozen=True)
class EvalPlan:
    """Evaluate dataset ``data`` in chunks of ``chunk`` samples on evaluation random
    streams ``stream`` (so evaluating never changes training)."""

    data: str
    size: int
    chunk: int
    stream: int
    timeout_s: float

    @property
    def chunks(self) -> int:
        return -(-self.size // self.chunk)


@dataclass
class EvalResult:
    """Summed loss (× samples) and correct count over an evaluation (the last stage's)."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0


@dataclass
class StageReport:
    """What stage ``stage`` observed in one epoch. Times are on the worker's own
    ``time.perf_counter`` clock; the backend maps them onto the scheduler's."""

    stage: int
    records: list[ActionRecord]
    stats: list[dict[str, float]]
    counters: StageCounters
    bytes_sent: int
    overruns: int = 0
    overrun_s: float = 0.0

    def shift(self, offset: float) -> None:
        """Move every time by ``offset`` seconds (onto another clock)."""
        self.records = shifted(self.records, offset)


def shifted(records: Sequence[ActionRecord], offset: float) -> list[ActionRecord]:
    return [ActionRecord(r.action, r.start + offset, r.end + offset) for r in records]
