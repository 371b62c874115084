"""What the central scheduler sends its stage workers, and what they send back.

Everything that must agree across processes is decided once on the scheduler and travels in
these plain records (they pickle): the stage's blocks and loss (:class:`StageSpec`), an
epoch's lr, sample order and schedule shape (:class:`EpochPlan`), an evaluation pass
(:class:`EvalPlan`). A worker builds its own action list from the plan (the scheduler package
is pure data), so no schedule travels, and it never reads another process's clock or random
state. What comes back is a :class:`StageReport` per epoch.

The shape of an epoch is checked here too, before any work: how many mini-batches a
training set makes (:func:`minibatches_per_epoch`), and whether the stages' timeout leaves
room for the longest wait of an emulated-time schedule (:func:`check_waits`).
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from aimcpipe.errors import ConfigError
from aimcpipe.runtime.interpreter import ActionRecord
from aimcpipe.scheduler import (
    Action,
    CostModel,
    Schedule,
    build_schedule,
    longest_wait,
    simulate,
)
from aimcpipe.stages.stage import LossFn, StageCounters

__all__ = [
    "EpochPlan",
    "EvalPlan",
    "EvalResult",
    "StageReport",
    "StageSpec",
    "check_waits",
    "minibatches_per_epoch",
    "shifted",
]


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


def minibatches_per_epoch(size: int, microbatches: int, microbatch_size: int) -> int:
    """K: the whole mini-batches of ``microbatches`` × ``microbatch_size`` samples in ``size``
    training samples (the rest is dropped); fewer than one is a config error."""
    per = microbatches * microbatch_size
    k = size // per
    if k < 1:
        raise ConfigError(
            f"data: {size} training samples are fewer than one mini-batch "
            f"(pipeline.microbatches {microbatches} × pipeline.microbatch_size "
            f"{microbatch_size} = {per})"
        )
    return k


def check_waits(schedule: Schedule, costs: CostModel, cycle_s: float, timeout_s: float) -> None:
    """With emulated device time (``cycle_s`` per cost-model cycle) the schedule says how long
    a stage will wait for a message; a timeout shorter than that would stop a healthy run, so
    refuse it now."""
    wait, action = longest_wait(simulate(schedule, costs))
    wait_s = wait * cycle_s
    if 1.2 * wait_s + 1.0 > timeout_s:
        raise ConfigError(
            f"runtime.timeout_s: with device_time.cycle_s {cycle_s:g} a stage of this "
            f"schedule waits {wait_s:.3g} s (for {action}), too close to the timeout of "
            f"{timeout_s:g} s; raise runtime.timeout_s above "
            f"{1.2 * wait_s + 1.0:.3g} s or lower device_time.cycle_s"
        )


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

    def means(self, size: int, accuracy: bool) -> dict[str, float]:
        """Mean loss over ``size`` samples, and the accuracy if asked (classification)."""
        out = {"loss": self.loss_sum / size}
        if accuracy:
            out["accuracy"] = self.correct / size
        return out


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

    # A report crosses processes after every epoch, between the epoch's last action and the
    # next epoch's first. Pickled as it is, object by object (an epoch holds a record, an
    # action and a stats dict per action), 544 records took 2.4 ms to write on a 2-core
    # VM; packed into a few flat arrays it takes a fraction of that.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["records"] = _pack_records(self.records)
        state["stats"] = _pack_stats(self.stats)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["records"] = _unpack_records(state["stage"], state["records"])
        state["stats"] = _unpack_stats(state["stats"])
        self.__dict__.update(state)


def _pack_records(records: Sequence[ActionRecord]) -> tuple[str, array, array]:
    """Kinds (one letter each), micro-batches (count, then the indices, per action) and
    times (start, end per action). The actions are all the report's stage's."""
    kinds = "".join(r.action.kind for r in records)
    mbs = array("q")
    times = array("d")
    for r in records:
        m = r.action.microbatches
        mbs.append(len(m))
        mbs.extend(m)
        times.append(r.start)
        times.append(r.end)
    return kinds, mbs, times


def _unpack_records(stage: int, packed: tuple[str, array, array]) -> list[ActionRecord]:
    kinds, mbs, times = packed
    records = []
    at = 0
    for i, kind in enumerate(kinds):
        count = mbs[at]
        action = Action._fast(kind, stage, tuple(mbs[at + 1 : at + 1 + count]))  # type: ignore[arg-type]
        at += 1 + count
        records.append(ActionRecord(action, times[2 * i], times[2 * i + 1]))
    return records


def _pack_stats(stats: list[dict[str, float]]) -> Any:
    """The per-micro-batch statistics as their keys and one flat array of values, when every
    micro-batch has the same keys (as they do); else as they are."""
    if not stats:
        return stats
    keys = tuple(stats[0])
    if any(tuple(d) != keys for d in stats):
        return stats
    return keys, array("d", (d[k] for d in stats for k in keys))


def _unpack_stats(packed: Any) -> list[dict[str, float]]:
    if isinstance(packed, list):
        return packed
    keys, values = packed
    width = len(keys)
    return [
        dict(zip(keys, values[i : i + width], strict=True)) for i in range(0, len(values), width)
    ]


def shifted(records: Sequence[ActionRecord], offset: float) -> list[ActionRecord]:
    return [ActionRecord(r.action, r.start + offset, r.end + offset) for r in records]
