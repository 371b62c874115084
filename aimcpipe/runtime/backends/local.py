"""The in-process backend: every stage in this process, interleaved by :func:`run_local` over
one :class:`~aimcpipe.runtime.transport.LocalTransport`. It is the numerical reference the
multi-process backends are held to."""

from __future__ import annotations

from typing import Any

import torch

from aimcpipe.runtime.backends.base import Backend, Progress, intra_op_threads
from aimcpipe.runtime.interpreter import run_local
from aimcpipe.runtime.plan import EpochPlan, EvalPlan, EvalResult, StageReport, StageSpec
from aimcpipe.runtime.transport import LocalTransport
from aimcpipe.runtime.worker import StageWorker, data_for_stage, pick_device
from aimcpipe.scheduler import BACKWARD, Action

__all__ = ["LocalBackend"]


class LocalBackend(Backend):
    name = "local"

    def start(self, specs: list[StageSpec]) -> None:
        device = pick_device(self.options.device)
        self.workers = [StageWorker(spec, device) for spec in specs]
        self.num_stages = len(specs)

    def put_data(self, key: str, x: torch.Tensor, y: torch.Tensor) -> None:
        for w in self.workers:
            w.put_data(key, *data_for_stage(w.index, self.num_stages, x, y))

    def drop_data(self, key: str) -> None:
        for w in self.workers:
            w.drop_data(key)

    def run_epoch(self, plan: EpochPlan, progress: Progress | None = None) -> list[StageReport]:
        transport = LocalTransport()
        its = [w.interpreter(plan, transport) for w in self.workers]
        done = 0

        def on_action(action: Action) -> None:
            nonlocal done
            if action.kind == BACKWARD and action.stage == 0:
                done += 1
                assert progress is not None
                progress(done)

        with intra_op_threads(self.options.threads):
            run_local(its, on_action if progress is not None else None)
        return [
            w.report(it, transport.bytes_sent.get(w.index, 0))
            for w, it in zip(self.workers, its, strict=True)
        ]

    def evaluate(self, plan: EvalPlan) -> EvalResult:
        transport = LocalTransport()
        steps = [w.evaluate_steps(plan, transport) for w in self.workers]
        with intra_op_threads(self.options.threads):
            for _ in range(plan.chunks):
                for step in steps:  # stage order: each chunk flows through all stages
                    next(step)
            results = [next(step) for step in steps]
        result = results[-1]
        assert result is not None
        return result

    def state_dicts(self) -> list[dict[str, Any]]:
        return [w.state_dict() for w in self.workers]

    def load_state_dicts(self, states: list[dict[str, Any]]) -> None:
        for w, state in zip(self.workers, states, strict=True):
            w.load_state_dict(state)

    def model_states(self) -> list[dict[str, Any]]:
        return [w.model_state() for w in self.workers]

    def close(self) -> None:
        """Nothing runs outside this process."""
