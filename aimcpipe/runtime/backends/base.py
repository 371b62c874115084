"""What every backend does for the central scheduler (docs/design.md §5, "Backend").

A backend starts the stage workers (:class:`~aimcpipe.runtime.worker.StageWorker`), places
the data on them, runs epoch plans and evaluation passes on them, gathers their reports and
states, and stops them. ``local``, ``torch`` and ``ray`` differ only in where the workers live
and which transport carries their messages; the workers run the same code everywhere.

Times in the reports a backend returns are on the scheduler's ``time.perf_counter`` clock
(remote clocks are mapped onto it; see :mod:`aimcpipe.runtime.clock`).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch

from aimcpipe.runtime.options import RuntimeOptions
from aimcpipe.runtime.plan import EpochPlan, EvalPlan, EvalResult, StageReport, StageSpec

__all__ = ["Backend", "Progress", "intra_op_threads"]

Progress = Callable[[int], None]  # called with the micro-batches finished so far this epoch


@contextlib.contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` for the block, then restored."""
    before = torch.get_num_threads()
    if before != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class Backend(ABC):
    """Where a pipeline's stages run. Use as a context manager or call :meth:`close`."""

    name: ClassVar[str]

    def __init__(self, options: RuntimeOptions | None = None) -> None:
        self.options = options or RuntimeOptions()
        self.num_stages = 0

    @abstractmethod
    def start(self, specs: list[StageSpec]) -> None:
        """Install one stage per spec (starting workers if none run yet)."""

    @abstractmethod
    def put_data(self, key: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """Give the first stage the inputs ``x`` and the last stage the targets ``y``."""

    @abstractmethod
    def drop_data(self, key: str) -> None:
        """Forget a dataset placed with :meth:`put_data`."""

    @abstractmethod
    def run_epoch(self, plan: EpochPlan, progress: Progress | None = None) -> list[StageReport]:
        """Run ``plan`` on every stage; one report per stage, times on this clock."""

    @abstractmethod
    def evaluate(self, plan: EvalPlan) -> EvalResult:
        """Pass ``plan``'s data through every stage; the last stage's sums."""

    @abstractmethod
    def state_dicts(self) -> list[dict[str, Any]]:
        """Every stage's checkpoint state (the pipeline must be drained)."""

    @abstractmethod
    def load_state_dicts(self, states: list[dict[str, Any]]) -> None: ...

    @abstractmethod
    def model_states(self) -> list[dict[str, Any]]:
        """Every stage's blocks' state_dict, keyed as in the whole model."""

    def clocks(self) -> dict[str, Any]:
        """How the stages' clocks map onto the scheduler's (for the trace)."""
        return {"method": "one process: one clock"}

    @abstractmethod
    def close(self) -> None:
        """Stop the workers (idempotent)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
