"""One training epoch on the stages, and what the pipeline keeps of it.

An :class:`EpochRunner` runs an :class:`~aimcpipe.runtime.plan.EpochPlan` on a started
backend (with a progress bar if asked), times it, and turns the stages' reports into an
:class:`~aimcpipe.runtime.metrics.EpochResult` beside the simulator's prediction of the same
schedule (remembered per schedule shape). It keeps the first epoch's executed actions, with
how each stage's clock was mapped, for the run directory's ``trace.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aimcpipe.runtime.backends import Backend
from aimcpipe.runtime.interpreter import ActionRecord
from aimcpipe.runtime.memo import ByIdentity
from aimcpipe.runtime.metrics import EpochResult
from aimcpipe.runtime.plan import EpochPlan, StageReport, shifted
from aimcpipe.scheduler import SimResult, simulate

__all__ = ["EpochRunner"]


class EpochRunner:
    """Runs epochs and keeps ``trace`` (the first epoch run since it was None: records per
    stage on the scheduler's clock), ``trace_epoch`` and ``trace_clocks``."""

    def __init__(self) -> None:
        self.trace: list[list[ActionRecord]] | None = None  # this session's first epoch
        self.trace_epoch = 0
        self.trace_clocks: dict[str, Any] | None = None
        self._simulated: ByIdentity[SimResult] = ByIdentity(8)  # per schedule and costs

    def run(
        self,
        backend: Backend,
        plan: EpochPlan,
        guarded: Callable[..., Any],
        show_progress: bool,
        epochs: int | None = None,
    ) -> EpochResult:
        """Run ``plan`` through ``guarded(backend.run_epoch, ...)``, with a progress bar if
        ``show_progress`` (``epochs`` only labels it)."""
        bar = None
        progress = None
        if show_progress:
            from tqdm.auto import tqdm

            label = f"epoch {plan.epoch + 1}" + (f"/{epochs}" if epochs else "")
            bar = tqdm(total=plan.minibatches, desc=label, unit="mini-batch", leave=False)

            def progress(done: int) -> None:
                assert bar is not None
                bar.update(done // plan.microbatches - bar.n)

        origin = time.perf_counter()
        try:
            reports = guarded(backend.run_epoch, plan, progress)
        finally:
            if bar is not None:
                bar.close()
        wall = time.perf_counter() - origin
        return self.result(backend, plan, reports, origin, wall)

    def result(
        self,
        backend: Backend,
        plan: EpochPlan,
        reports: list[StageReport],
        origin: float,
        wall: float,
    ) -> EpochResult:
        records = [shifted(rep.records, -origin) for rep in reports]
        schedule = plan.schedule()  # interpreters run their lists in order: this is what ran
        costs = plan.costs
        sim = self._simulated.get((schedule,), costs, lambda: simulate(schedule, costs))
        if self.trace is None:
            self.trace = records
            self.trace_epoch = plan.epoch
            self.trace_clocks = backend.clocks()
        return EpochResult.from_run(
            epoch=plan.epoch,
            lr=plan.lr,
            stats=reports[-1].stats,
            records=records,
            wall_s=wall,
            sim=sim,
            counters=[rep.counters for rep in reports],
            bytes_sent=[rep.bytes_sent for rep in reports],
            overruns=[rep.overruns for rep in reports],
            cycle_s=plan.cycle_s,
        )
