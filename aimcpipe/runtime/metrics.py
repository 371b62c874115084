"""What a training run measured, epoch by epoch and in total (docs/design.md §5–§6).

``EpochResult`` is one epoch: losses, accuracy, the executed actions' wall-clock busy time per
stage, and the cycles the cost model gives for those same actions. ``RunMetrics`` accumulates
epochs and writes the ``metrics.json`` contract::

    policy, backend, stages, microbatches, final.{train_loss, test_loss, test_accuracy},
    cycles.{makespan, utilization}, measured.{wall_s, utilization}, staleness, peak_stash,
    samples_per_s

Measured utilization is a stage's busy seconds over the seconds the schedules took to run
(evaluation excluded). On the in-process backend the stages take turns in one process, so it
sums to about 1 across stages; the multi-process backends overlap them.

With emulated device time (``device_time.cycle_s``) the cost model predicts each epoch's
makespan in seconds (cycles × cycle_s); ``device_time.efficiency`` is that prediction over the
measured makespan (first action start to last action end, all stages), i.e. how much of the
schedule's timing survives the runtime's own overhead. Both sum over the epochs that ran with
emulated time (a resumed run may change ``cycle_s``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aimcpipe.scheduler import KINDS, SimResult

__all__ = ["EpochResult", "RunMetrics"]


@dataclass
class EpochResult:
    epoch: int
    lr: float
    samples: int
    train_loss: float
    train_accuracy: float | None
    wall_s: float
    busy_s: list[float]
    busy_s_by_kind: list[dict[str, float]]
    cycles: float
    busy_cycles: list[float]
    staleness_histogram: list[dict[int, int]]
    peak_stash: list[int]
    peak_stash_bytes: list[int]
    bytes_sent: list[int]
    makespan_s: float = 0.0
    overruns: list[int] = field(default_factory=list)
    cycle_s: float | None = None
    test_loss: float | None = None
    test_accuracy: float | None = None

    @classmethod
    def from_run(
        cls,
        *,
        epoch: int,
        lr: float,
        stats: Sequence[dict[str, float]],
        records: Sequence[Sequence[Any]],
        wall_s: float,
        sim: SimResult,
        counters: Sequence[Any],
        bytes_sent: list[int],
        overruns: list[int] | None = None,
        cycle_s: float | None = None,
    ) -> EpochResult:
        samples = sum(s["samples"] for s in stats)
        loss = sum(s["loss"] * s["samples"] for s in stats) / samples
        accuracy = None
        if stats and "correct" in stats[0]:
            accuracy = sum(s["correct"] for s in stats) / samples
        starts = [r.start for stage_records in records for r in stage_records[:1]]
        ends = [r.end for stage_records in records for r in stage_records[-1:]]
        by_kind = []
        for stage_records in records:
            totals = dict.fromkeys(KINDS, 0.0)
            for r in stage_records:
                totals[r.action.kind] += r.end - r.start
            by_kind.append(totals)
        return cls(
            epoch=epoch,
            lr=lr,
            samples=int(samples),
            train_loss=loss,
            train_accuracy=accuracy,
            wall_s=wall_s,
            busy_s=[sum(t.values()) for t in by_kind],
            busy_s_by_kind=by_kind,
            cycles=sim.makespan,
            busy_cycles=list(sim.busy),
            staleness_histogram=[dict(c.staleness_histogram) for c in counters],
            peak_stash=[c.peak_stash for c in counters],
            peak_stash_bytes=[c.peak_stash_bytes for c in counters],
            bytes_sent=bytes_sent,
            makespan_s=max(ends) - min(starts) if starts else 0.0,
            overruns=list(overruns) if overruns is not None else [0] * len(records),
            cycle_s=cycle_s,
        )

    def history_row(self) -> dict[str, Any]:
        """One line of ``history.jsonl``."""
        return {
            "epoch": self.epoch + 1,
            "lr": self.lr,
            "train_loss": self.train_loss,
            "train_accuracy": self.train_accuracy,
            "test_loss": self.test_loss,
            "test_accuracy": self.test_accuracy,
            "samples": self.samples,
            "wall_s": self.wall_s,
            "cycles": self.cycles,
        }

    def summary(self, epochs: int) -> str:
        parts = [f"epoch {self.epoch + 1}/{epochs}", f"lr {self.lr:.3g}"]
        parts.append(f"train loss {self.train_loss:.4f}")
        if self.test_loss is not None:
            parts.append(f"test loss {self.test_loss:.4f}")
        if self.test_accuracy is not None:
            parts.append(f"test acc {100 * self.test_accuracy:.2f}%")
        parts.append(f"{self.wall_s:.1f}s")
        return ", ".join(parts)


def _new_measured(stages: int) -> dict[str, Any]:
    return {
        "wall_s": 0.0,
        "makespan_s": 0.0,
        "busy_s": [0.0] * stages,
        "busy_s_by_kind": [dict.fromkeys(KINDS, 0.0) for _ in range(stages)],
        "bytes_sent": [0] * stages,
        "overruns": [0] * stages,
        "paced_predicted_s": 0.0,
        "paced_makespan_s": 0.0,
    }


def _add(into: list[Any], values: Sequence[Any]) -> list[Any]:
    return [a + b for a, b in zip(into, values, strict=True)] if into else list(values)


@dataclass
class RunMetrics:
    """Totals over the epochs run so far (a resumed run continues the totals)."""

    policy: str
    backend: str
    stages: int
    microbatches: int
    microbatch_size: int
    epochs: int = 0
    samples: int = 0
    train_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, float | None] = field(default_factory=dict)
    cycles: dict[str, Any] = field(default_factory=dict)
    measured: dict[str, Any] = field(default_factory=dict)
    staleness_histogram: list[dict[int, int]] = field(default_factory=list)
    peak_stash: list[int] = field(default_factory=list)
    peak_stash_bytes: list[int] = field(default_factory=list)
    cycle_s: float | None = None

    @classmethod
    def new(cls, **kwargs: Any) -> RunMetrics:
        m = cls(**kwargs)
        zeros = [0] * m.stages
        m.cycles = {"makespan": 0, "busy": list(zeros)}
        m.measured = _new_measured(m.stages)
        m.staleness_histogram = [{} for _ in zeros]
        m.peak_stash = list(zeros)
        m.peak_stash_bytes = list(zeros)
        return m

    def add_epoch(self, r: EpochResult) -> None:
        self.epochs += 1
        self.samples += r.samples
        self.train_s += r.wall_s
        self.history.append(r.history_row())
        self.final = {
            "train_loss": r.train_loss,
            "train_accuracy": r.train_accuracy,
            "test_loss": r.test_loss,
            "test_accuracy": r.test_accuracy,
        }
        self.cycles["makespan"] += r.cycles
        self.cycles["busy"] = _add(self.cycles["busy"], r.busy_cycles)
        m = self.measured
        m["makespan_s"] += r.makespan_s
        m["overruns"] = _add(m["overruns"], r.overruns)
        if r.cycle_s:  # emulated device time: what the cost model predicts for this epoch
            m["paced_predicted_s"] += r.cycles * r.cycle_s
            m["paced_makespan_s"] += r.makespan_s
        m["busy_s"] = _add(m["busy_s"], r.busy_s)
        m["bytes_sent"] = _add(m["bytes_sent"], r.bytes_sent)
        for total, epoch in zip(m["busy_s_by_kind"], r.busy_s_by_kind, strict=True):
            for k, v in epoch.items():
                total[k] += v
        for total, epoch in zip(self.staleness_histogram, r.staleness_histogram, strict=True):
            for k, v in epoch.items():
                total[k] = total.get(k, 0) + v
        self.peak_stash = [max(a, b) for a, b in zip(self.peak_stash, r.peak_stash, strict=True)]
        self.peak_stash_bytes = [
            max(a, b) for a, b in zip(self.peak_stash_bytes, r.peak_stash_bytes, strict=True)
        ]

    @property
    def staleness(self) -> list[int]:
        """Max observed staleness per stage (updates between a micro-batch's F and B)."""
        return [max(h, default=0) for h in self.staleness_histogram]

    def to_dict(self) -> dict[str, Any]:
        """The ``metrics.json`` object."""
        makespan = self.cycles["makespan"]
        cycles_util = [b / makespan if makespan else 0.0 for b in self.cycles["busy"]]
        measured_util = [b / self.train_s if self.train_s else 0.0 for b in self.measured["busy_s"]]
        out: dict[str, Any] = {
            "policy": self.policy,
            "backend": self.backend,
            "stages": self.stages,
            "microbatches": self.microbatches,
            "microbatch_size": self.microbatch_size,
            "epochs": self.epochs,
            "samples": self.samples,
            "final": dict(self.final),
            "cycles": {
                "makespan": makespan,
                "utilization": cycles_util,
                "busy": list(self.cycles["busy"]),
            },
            "measured": {
                "wall_s": self.measured["wall_s"],
                "train_s": self.train_s,
                "utilization": measured_util,
                "busy_s": list(self.measured["busy_s"]),
                "idle_s": [max(self.train_s - b, 0.0) for b in self.measured["busy_s"]],
                "busy_s_by_kind": copy.deepcopy(self.measured["busy_s_by_kind"]),
                "bytes_sent": list(self.measured["bytes_sent"]),
                "makespan_s": self.measured["makespan_s"],
                "overruns": list(self.measured["overruns"]),
            },
            "staleness": self.staleness,
            "staleness_histogram": [
                {str(k): v for k, v in sorted(h.items())} for h in self.staleness_histogram
            ],
            "peak_stash": list(self.peak_stash),
            "peak_stash_bytes": list(self.peak_stash_bytes),
            "samples_per_s": self.samples / self.train_s if self.train_s else math.nan,
        }
        if self.measured["paced_makespan_s"]:
            predicted = self.measured["paced_predicted_s"]
            measured = self.measured["paced_makespan_s"]
            out["device_time"] = {  # over the epochs run with emulated device time
                "cycle_s": self.cycle_s,
                "predicted_s": predicted,
                "measured_s": measured,
                "efficiency": predicted / measured,
            }
        return out

    def to_state(self) -> dict[str, Any]:
        """Plain data for a checkpoint."""
        return copy.deepcopy(self.__dict__)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RunMetrics:
        state = copy.deepcopy(state)
        m = cls(**state)
        for key, value in _new_measured(m.stages).items():
            m.measured.setdefault(key, value)
        m.staleness_histogram = [{int(k): v for k, v in h.items()} for h in m.staleness_histogram]
        return m
