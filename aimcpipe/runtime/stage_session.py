"""The stage workers of one :class:`~aimcpipe.runtime.Pipeline` on its backend.

A :class:`StageSession` starts the workers once (and gives them a checkpoint's states that
arrived before they existed), places each dataset on them once, remembers a stage failure so
that the pipeline refuses to go on from a stage left mid-schedule, and keeps the workers'
states when they are stopped, so that new workers continue exactly. It answers for the
stages' states and the whole model's weights whether or not workers run. The pipeline makes
the backend (from its current options) and decides what the workers are built from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aimcpipe.errors import AimcpipeError, StageFailure
from aimcpipe.runtime.backends import Backend
from aimcpipe.runtime.datasets import Dataset
from aimcpipe.runtime.plan import StageSpec

__all__ = ["HELD_DATASETS", "StageSession"]

HELD_DATASETS = 3  # training, test, and one more evaluated dataset stay on the stages


class StageSession:
    """The workers on ``backend``: a started backend given by the caller (then never closed
    here), or None until the pipeline makes one (then closed with the workers)."""

    def __init__(self, backend: Backend | None) -> None:
        self.backend = backend
        self.owns_backend = backend is None
        self.started = False
        self.failed: str | None = None  # why the workers stopped mid-schedule
        self.pending_states: list[dict[str, Any]] | None = None  # for the next workers
        self._datasets: dict[int, tuple[str, Dataset]] = {}
        self._placed = 0

    def check_usable(self) -> None:
        if self.failed is not None:
            raise StageFailure(
                f"this pipeline's stages stopped after a failure ({self.failed}); build a new "
                "Pipeline and load_checkpoint to continue"
            )

    def start(self, backend: Backend, specs: Callable[[], list[StageSpec]]) -> Backend:
        """Start the workers on ``backend`` from ``specs()`` unless they run already."""
        if not self.started:
            backend.start(specs())
            self.started = True
            if self.pending_states is not None:
                backend.load_state_dicts(self.pending_states)
                self.pending_states = None
        return backend

    def data_key(self, backend: Backend, data: Dataset) -> str:
        """Place ``data`` on the stages once (inputs on the first, targets on the last); the
        stages hold the last :data:`HELD_DATASETS` datasets used."""
        held = self._datasets.pop(id(data), None)
        if held is not None:
            self._datasets[id(data)] = held  # the most recently used last
            return held[0]
        self._placed += 1
        key = f"data{self._placed}"
        backend.put_data(key, data.x, data.y)
        self._datasets[id(data)] = (key, data)  # holding ``data`` keeps its id unique
        while len(self._datasets) > HELD_DATASETS:
            old_key, _ = self._datasets.pop(next(iter(self._datasets)))
            backend.drop_data(old_key)
        return key

    def guarded(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call the backend; a stage failure (or an interruption mid-epoch) leaves stages
        mid-schedule, so the pipeline refuses to go on from there."""
        try:
            return fn(*args)
        except StageFailure as exc:
            self.failed = str(exc)
            raise
        except KeyboardInterrupt:
            self.failed = "interrupted"
            raise

    def states(self, initial: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """Every stage's full state: the workers', those waiting for the next workers, or
        else ``initial()`` (the stages as they would start)."""
        if self.started:
            assert self.backend is not None
            return self.backend.state_dicts()
        if self.pending_states is not None:
            return self.pending_states
        return initial()

    def model_state(self, initial: Callable[[], list[dict[str, Any]]]) -> dict[str, Any]:
        """The whole model's weights (stages merged), keyed as ``model.state_dict()``."""
        if self.started:
            assert self.backend is not None
            states = self.backend.model_states()
        else:
            states = [
                {f"{name}.{key}": v for name, sd in st["blocks"].items() for key, v in sd.items()}
                for st in self.states(initial)
            ]
        merged: dict[str, Any] = {}
        for state in states:
            merged.update(state)
        return merged

    def load_states(self, states: list[dict[str, Any]]) -> None:
        """Give the workers these states now, or when they start."""
        if self.started:
            assert self.backend is not None
            self.backend.load_state_dicts(states)
        else:
            self.pending_states = states

    def close(self) -> None:
        """Stop the workers, keeping their states first; close the backend if made here."""
        if self.backend is None:
            return
        if self.started and self.failed is None:
            try:
                self.pending_states = self.backend.state_dicts()
            except AimcpipeError as exc:
                self.failed = str(exc)
        if self.owns_backend:
            self.backend.close()
            self.backend = None
        self.started = False
        self._datasets.clear()
