"""The stage worker: a :class:`~aimcpipe.stages.Stage`, the one interpreter and a transport.

This is the same code on every backend: the in-process backend holds S workers in one
process and interleaves them; the torch backend runs one per process; the Ray backend one
per actor. A worker is told everything it must agree on with the others (its blocks and
loss, each epoch's plan) and answers with what it observed; it never reads another
process's clock or random state.

Data: the first stage holds the inputs and the last stage the targets of each dataset the
scheduler registered with :meth:`StageWorker.put_data` (middle stages hold none); an epoch
plan names the dataset and carries the sample order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from aimcpipe.runtime.interpreter import Interpreter
from aimcpipe.runtime.losses import resolve_loss
from aimcpipe.runtime.plan import EpochPlan, EvalPlan, EvalResult, StageReport, StageSpec
from aimcpipe.runtime.transport import Key, Transport
from aimcpipe.scheduler import BACKWARD, FORWARD, UPDATE, Action
from aimcpipe.stages.stage import Stage, StageCounters

__all__ = ["StageData", "StageWorker", "data_for_stage", "pick_device"]

log = logging.getLogger(__name__)

FEED_BLOCK = 16  # micro-batches of inputs (targets) gathered at once, at most ...
FEED_BYTES = 2 << 20  # ... and about this many bytes (at least one micro-batch)


def pick_device(option: str, local_rank: int = 0) -> torch.device:
    """``auto``: ``cuda:(local_rank % GPUs)`` when CUDA is available, else the CPU."""
    if option == "cpu" or (option == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from aimcpipe.errors import ConfigError

        raise ConfigError("runtime.device: 'cuda' asked for but CUDA is not available here")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


@dataclass
class StageData:
    """A dataset as one stage holds it: inputs on the first stage, targets on the last."""

    x: torch.Tensor | None = None
    y: torch.Tensor | None = None


def data_for_stage(
    s: int, num_stages: int, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """What stage ``s`` holds of a dataset: the inputs if it is the first, the targets if it
    is the last."""
    return (x if s == 0 else None, y if s == num_stages - 1 else None)


class StageWorker:
    """One stage of a pipeline, able to run epoch plans and evaluation passes."""

    def __init__(self, spec: StageSpec, device: torch.device | str = "cpu") -> None:
        self.index = spec.index
        self.num_stages = spec.num_stages
        self.device = torch.device(device)
        for _, module in spec.blocks:
            module.to(self.device)
        last = spec.index == spec.num_stages - 1
        self.stage = Stage(
            spec.index,
            spec.num_stages,
            spec.blocks,
            lr=spec.lr,
            loss_fn=resolve_loss(spec.loss) if last and spec.loss is not None else None,
            seed=spec.seed,
            weight_stashing=spec.weight_stashing,
        )
        self.data: dict[str, StageData] = {}
        self.current: Interpreter | None = None  # the epoch being run (for progress reports)
        self.epoch: int | None = None
        self._eval: tuple[int, int] | None = None  # (chunk, chunks) of a running evaluation

    # -- data --------------------------------------------------------------------------------
    def put_data(self, key: str, x: torch.Tensor | None, y: torch.Tensor | None) -> None:
        self.data[key] = StageData(x, y)

    def drop_data(self, key: str) -> None:
        self.data.pop(key, None)

    def _feed(self, plan: EpochPlan) -> Callable[[Key], torch.Tensor]:
        """Micro-batch ``n``'s inputs or targets in the plan's sample order. They are
        gathered a block of micro-batches at a time (at most ``FEED_BLOCK`` of them, and
        about ``FEED_BYTES``), and each micro-batch is a view into its block: one gather per
        block instead of one per micro-batch, which the stage pays between two actions with
        its caches cold from the last one (about 40 µs each on a 2-core VM)."""
        data = self.data[plan.data]
        order = plan.order
        b = plan.microbatch_size
        device = self.device
        blocks: dict[str, tuple[int, int, torch.Tensor]] = {}  # kind -> (first, count, block)

        def feed(key: Key) -> torch.Tensor:
            kind, n, _, _ = key
            assert order is not None
            held = blocks.get(kind)
            if held is None or not held[0] <= n < held[0] + held[1]:
                source = data.x if kind == "input" else data.y
                assert source is not None, f"stage {self.index} holds no {kind}s of {plan.data}"
                row = max(1, source[:1].numel() * source.element_size())
                count = max(1, min(FEED_BLOCK, FEED_BYTES // (row * b)))
                gathered = source[order[n * b : (n + count) * b]]
                if gathered.device != device:
                    gathered = gathered.to(device, non_blocking=True)
                held = blocks[kind] = (n, count, gathered)
            first, _, block = held
            return block[(n - first) * b : (n - first + 1) * b]

        return feed

    # -- training ----------------------------------------------------------------------------
    def interpreter(self, plan: EpochPlan, transport: Transport) -> Interpreter:
        """This stage's interpreter for ``plan`` (times on this process's clock)."""
        self.stage.lr = plan.lr
        self.stage.counters = StageCounters()
        self.stage.recheck_randomness()
        actions = plan.schedule().stages[self.index]
        pace = None
        if plan.cycle_s:
            f, b, u = (c[self.index] for c in plan.costs.per_stage(self.num_stages))
            cycle = plan.cycle_s
            cost = {FORWARD: f * cycle, BACKWARD: b * cycle, UPDATE: u * cycle}

            def pace(action: Action) -> float:
                per = cost[action.kind]
                return per * len(action.microbatches) if action.kind == UPDATE else per

        it = Interpreter(
            self.stage,
            actions,
            transport,
            feed=self._feed(plan),
            timeout=plan.timeout_s,
            origin=0.0,
            pace=pace,
        )
        self.current = it
        self.epoch = plan.epoch
        return it

    def report(self, it: Interpreter, bytes_sent: int = 0) -> StageReport:
        return StageReport(
            stage=self.index,
            records=it.records,
            stats=it.stats,
            counters=self.stage.counters,
            bytes_sent=bytes_sent,
            overruns=it.overruns,
            overrun_s=it.overrun_s,
        )

    def run_epoch(
        self,
        plan: EpochPlan,
        transport: Transport,
        on_action: Callable[[Action], None] | None = None,
        before: Callable[[int], None] | None = None,
    ) -> StageReport:
        """Run this stage's whole list for ``plan`` (receives block, with the plan's timeout)."""
        it = self.interpreter(plan, transport)
        sent = _bytes_sent(transport, self.index)
        latency = plan.costs.latency * plan.cycle_s if plan.cycle_s else 0.0
        transport.begin(self.expected_messages(it.actions), latency)
        it.run(on_action, before)
        transport.end()
        return self.report(it, _bytes_sent(transport, self.index) - sent)

    def expected_messages(self, acts: Sequence[Action]) -> dict[int, int]:
        """How many messages this stage receives from each neighbour while running ``acts``."""
        counts: dict[int, int] = {}
        if self.index > 0:
            counts[self.index - 1] = sum(1 for a in acts if a.kind == FORWARD)
        if self.index < self.num_stages - 1:
            counts[self.index + 1] = sum(1 for a in acts if a.kind == BACKWARD)
        return counts

    # -- evaluation --------------------------------------------------------------------------
    def evaluate_steps(self, plan: EvalPlan, transport: Transport) -> Iterator[EvalResult | None]:
        """Evaluate ``plan``'s chunks one at a time (a generator: the in-process backend
        interleaves the stages chunk by chunk, other backends run it through). The first
        stage reads inputs, others receive the previous stage's outputs; the last stage scores
        them and its final value is the :class:`EvalResult`."""
        s = self.index
        data = self.data.get(plan.data)
        loss = self.stage.loss_fn
        result = EvalResult()
        with self.stage.evaluation(plan.stream):
            for i in range(plan.chunks):
                self._eval = (i, plan.chunks)
                lo, hi = i * plan.chunk, min((i + 1) * plan.chunk, plan.size)
                if s == 0:
                    assert data is not None and data.x is not None
                    x = data.x[lo:hi].to(self.device, non_blocking=True)
                else:
                    x = transport.recv(("eval", i, s - 1, s), plan.timeout_s)
                y = self.stage.infer(x)
                if s < self.num_stages - 1:
                    transport.send(("eval", i, s, s + 1), y)
                    yield None
                    continue
                assert data is not None and data.y is not None and loss is not None
                t = data.y[lo:hi].to(self.device, non_blocking=True)
                result.loss_sum += float(loss(y, t)) * len(t)
                if y.dim() == 2 and t.dim() == 1 and not t.is_floating_point():
                    result.correct += int((y.argmax(dim=1) == t).sum())
                result.count += len(t)
                yield None
        self._eval = None
        yield result if s == self.num_stages - 1 else None

    def evaluate(self, plan: EvalPlan, transport: Transport) -> EvalResult | None:
        transport.begin(self.eval_messages(plan))
        result = list(self.evaluate_steps(plan, transport))[-1]
        transport.end()
        return result

    def eval_messages(self, plan: EvalPlan) -> dict[int, int]:
        return {self.index - 1: plan.chunks} if self.index > 0 else {}

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The stage's checkpoint state, on the CPU (so it can travel and be saved)."""
        return _to_cpu(self.stage.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage.load_state_dict(state)

    def model_state(self) -> dict[str, Any]:
        return _to_cpu(self.stage.model_state())

    def progress(self) -> dict[str, Any]:
        """Where the stage is: ``epoch``, actions ``done`` of ``total`` and the action it is
        ``at`` (running or waiting for its messages); in an evaluation, the chunk."""
        if self._eval is not None:
            i, chunks = self._eval
            return {"epoch": None, "done": i, "total": chunks, "at": f"evaluation chunk {i}"}
        it = self.current
        if it is None:
            return {"epoch": self.epoch, "done": 0, "total": 0, "at": None}
        nxt = it.next_action
        return {
            "epoch": self.epoch,
            "done": it.position,
            "total": len(it.actions),
            "at": None if nxt is None else str(nxt),
        }


def _bytes_sent(transport: Transport, stage: int) -> int:
    return int(getattr(transport, "bytes_sent", {}).get(stage, 0))


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return value
