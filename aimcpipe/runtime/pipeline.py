"""``Pipeline``: train any torch model (analog-converted or not) with a pipeline policy.

This is the central scheduler of the runtime and the Python API the ``aimcpipe train``
command is built on::

    from aimcpipe.runtime import Pipeline, load_dataset
    from aimcpipe.stages import build_model
    from aimcpipe.analog import AnalogConfig, convert

    train, test = load_dataset("digits")
    model = convert(build_model("digits-fcn"), AnalogConfig(rule="analog-sgd"))
    with Pipeline(model, stages=4, policy="async", microbatches=8, microbatch_size=8,
                  lr=0.1, backend="torch") as pipe:
        metrics = pipe.fit(train, test, epochs=5)
    print(metrics.final["test_accuracy"], metrics.cycles["makespan"])

The scheduler decides everything that must agree across stages once — the partition, the
loss, each epoch's lr and sample order — and a :class:`~aimcpipe.runtime.backends.Backend`
(``local``, ``torch`` or ``ray``) runs the stages: the same stage workers and interpreter on
every backend, so every backend trains the same weights. The scheduler keeps the metrics,
the checkpoints and the run directory.

Each epoch is one schedule of K mini-batches of Bm micro-batches (the last incomplete
mini-batch of an epoch is dropped; shuffling is per epoch, so every sample is used over
epochs). The async policy therefore drains at every epoch end, where the model must be
consistent for evaluation and checkpoints. ``fit(..., epochs=E)`` trains up to epoch E in
total: a pipeline restored from a checkpoint continues where it stopped.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aimcpipe.dataconf import check_int
from aimcpipe.errors import AimcpipeError, ConfigError, describe_exception
from aimcpipe.runtime.backends import Backend, make_backend
from aimcpipe.runtime.checkpoint import checkpoint_stages, load_checkpoint
from aimcpipe.runtime.datasets import Dataset, epoch_order
from aimcpipe.runtime.epoch_runner import EpochRunner
from aimcpipe.runtime.interpreter import ActionRecord
from aimcpipe.runtime.losses import LOSSES
from aimcpipe.runtime.lr import LRSchedule
from aimcpipe.runtime.metrics import EpochResult, RunMetrics
from aimcpipe.runtime.options import RayOptions, RuntimeOptions
from aimcpipe.runtime.pipeline_checks import (
    check_arguments,
    check_backend,
    cut_model,
    require_dataset,
    require_samples,
    stage_costs,
)
from aimcpipe.runtime.plan import (
    EpochPlan,
    EvalPlan,
    StageSpec,
    cached_schedule,
    check_waits,
    minibatches_per_epoch,
)
from aimcpipe.runtime.rundir import RunDirectory
from aimcpipe.runtime.stage_builder import StageBuilder
from aimcpipe.runtime.stage_session import StageSession
from aimcpipe.scheduler import CostModel, Schedule
from aimcpipe.stages.stage import LossFn

__all__ = ["LOSSES", "Pipeline"]

log = logging.getLogger(__name__)


class Pipeline:
    """A model cut into stages, trained under ``policy`` on a backend.

    ``stages``/``partition``: how to cut the model's blocks (see
    :func:`aimcpipe.stages.partition`); ``microbatches`` (Bm) micro-batches of
    ``microbatch_size`` samples make a mini-batch. ``loss`` is ``"cross-entropy"``,
    ``"mse"``, a callable, or None to pick by the dataset's task. ``out`` is the run
    directory; ``checkpoint_every`` epochs a checkpoint is written there.

    ``backend``: ``"local"`` (every stage in this process, the reference), ``"torch"`` (one
    process per stage, spawned here on loopback, or this process's torchrun world) or
    ``"ray"`` (one actor per stage), or a started :class:`Backend` to reuse (then it is not
    closed here). ``runtime``: threads per stage, timeouts, devices. ``cycle_s``: emulated
    device time per cost-model cycle. ``ray``: the Ray cluster and resources per actor.
    ``costs``: cycles per action; by default ``CostModel(per="layer")``, F = B = U = 1 per
    layer, so a stage is charged for the layers it holds (``self.costs`` is the per-stage
    result for this partition).
    Close the pipeline (or use it as a context manager) to stop its stage processes.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        stages: int | None = None,
        partition: str | Sequence[int] | Sequence[str] | Callable[..., Any] = "uniform",
        policy: str = "sync-1f1b",
        microbatches: int = 4,
        microbatch_size: int = 16,
        lr: float = 0.1,
        lr_schedule: LRSchedule | None = None,
        loss: str | LossFn | None = None,
        weight_stashing: bool = False,
        seed: int = 0,
        costs: CostModel | None = None,
        tile_size: int = 512,
        example_input: torch.Tensor | None = None,
        eval_batch_size: int = 256,
        out: str | Path | None = None,
        checkpoint_every: int = 0,
        progress: bool = True,
        backend: str | Backend = "local",
        runtime: RuntimeOptions | None = None,
        cycle_s: float | None = None,
        ray: RayOptions | None = None,
        settings: dict[str, Any] | None = None,
    ) -> None:
        check_arguments(
            policy=policy,
            microbatches=microbatches,
            microbatch_size=microbatch_size,
            lr=lr,
            seed=seed,
            eval_batch_size=eval_batch_size,
            checkpoint_every=checkpoint_every,
            weight_stashing=weight_stashing,
            progress=progress,
            lr_schedule=lr_schedule,
            out=out,
        )
        runtime, ray = check_backend(backend, runtime, ray, cycle_s, loss)
        self.model = model
        blocks, self.partition = cut_model(
            model, stages, partition, tile_size=tile_size, example_input=example_input
        )
        self.policy = policy
        self.microbatches = microbatches
        self.microbatch_size = microbatch_size
        self.lr = float(lr)
        self.lr_schedule = lr_schedule or LRSchedule()
        self.weight_stashing = weight_stashing
        self.seed = seed
        # ``cost_spec`` as given; ``costs`` is what each stage is charged
        self.cost_spec, self.costs = stage_costs(costs, self.partition)
        self.eval_batch_size = eval_batch_size
        self.out = Path(out) if out is not None else None
        self.checkpoint_every = checkpoint_every
        self.progress = progress
        self.runtime = runtime
        self.cycle_s = cycle_s
        self.ray = ray
        self.settings = settings
        self._builder = StageBuilder(blocks, self.partition.bounds, loss)  # blocks and loss
        given = backend if isinstance(backend, Backend) else None
        self._stages = StageSession(given)  # the workers: started, data, failure, states
        self.backend_name = given.name if given is not None else backend
        self.epoch = 0
        self.metrics = RunMetrics.new(
            policy=policy,
            backend=self.backend_name,
            stages=self.num_stages,
            microbatches=microbatches,
            microbatch_size=microbatch_size,
            cycle_s=cycle_s,
        )
        self._epochs = EpochRunner()  # runs epochs; keeps the first one's trace

    # -- stages --------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return self.partition.num_stages

    def specs(self) -> list[StageSpec]:
        """What each stage worker is built from (the loss must be chosen)."""
        return self._builder.specs(lr=self.lr, seed=self.seed, weight_stashing=self.weight_stashing)

    @property
    def backend(self) -> Backend:
        """The backend running the stages (started on first use)."""
        if self._stages.backend is None:
            self._stages.backend = make_backend(self.backend_name, self.runtime, self.ray)
        return self._stages.backend

    def _start(self, data: Dataset) -> Backend:
        self._stages.check_usable()
        self._builder.pick_loss(data)
        return self._stages.start(self.backend, self.specs)

    def close(self) -> None:
        """Stop the stage workers (processes or actors) this pipeline started. Their state
        is kept here first, so the pipeline stays usable: a later call starts new workers
        (or, on a backend it was given, sets its stages up again) and continues exactly."""
        self._stages.close()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- training --------------------------------------------------------------------------
    def schedule_for(self, minibatches: int) -> Schedule:
        return cached_schedule(
            self.policy, self.num_stages, self.microbatches, minibatches, self.weight_stashing
        )

    def _minibatches(self, data: Dataset) -> int:
        return minibatches_per_epoch(len(data), self.microbatches, self.microbatch_size)

    def _check_waits(self, minibatches: int) -> None:
        if self.cycle_s and self.backend_name != "local":
            schedule = self.schedule_for(minibatches)
            check_waits(schedule, self.costs, self.cycle_s, self.runtime.timeout_s)

    def plan(self, data: Dataset, epoch: int) -> EpochPlan:
        """Epoch ``epoch``'s plan over ``data`` (placed on the stages)."""
        require_dataset("data", data)
        check_int("epoch", epoch, 0)
        return EpochPlan(
            epoch=epoch,
            lr=self.lr_schedule.lr_at(self.lr, epoch),
            policy=self.policy,
            num_stages=self.num_stages,
            microbatches=self.microbatches,
            minibatches=self._minibatches(data),
            microbatch_size=self.microbatch_size,
            weight_stashing=self.weight_stashing,
            data=self._stages.data_key(self.backend, data),
            order=epoch_order(len(data), self.seed, epoch),
            costs=self.costs,
            cycle_s=self.cycle_s,
            timeout_s=self.runtime.timeout_s,
        )

    def train_epoch(self, data: Dataset, epoch: int, epochs: int | None = None) -> EpochResult:
        """Run one epoch's schedule over ``data`` (shuffled by seed and epoch); ``epochs``
        only labels the progress bar."""
        require_dataset("data", data)
        check_int("epoch", epoch, 0)
        backend = self._start(data)
        plan = self.plan(data, epoch)
        return self._epochs.run(backend, plan, self._stages.guarded, self.progress, epochs)

    @property
    def _trace(self) -> list[list[ActionRecord]] | None:
        """The first epoch's executed actions per stage (set None to trace the next one)."""
        return self._epochs.trace

    @_trace.setter
    def _trace(self, records: list[list[ActionRecord]] | None) -> None:
        self._epochs.trace = records

    def evaluate(self, data: Dataset, stream: int | None = None) -> dict[str, float]:
        """Mean loss (and accuracy for classification) of the current model on ``data``.

        Evaluation draws its IO noise from streams of its own (``stream``, by default the
        number of epochs trained), so it never changes training (see ``Stage.evaluation``)."""
        require_dataset("data", data)
        require_samples("data", data)
        backend = self._start(data)
        plan = EvalPlan(
            data=self._stages.data_key(self.backend, data),
            size=len(data),
            chunk=self.eval_batch_size,
            stream=self.epoch if stream is None else stream,
            timeout_s=self.runtime.timeout_s,
        )
        result = self._stages.guarded(backend.evaluate, plan)
        return result.means(len(data), accuracy=data.task == "classification")

    def check_data(self, data: Dataset) -> None:
        """Run one micro-batch through every stage and the loss (on evaluation streams, so
        training is unchanged): a model that does not fit the data fails here, before any
        file is written or process started, with one line naming the stage."""
        require_dataset("data", data)
        self._builder.check_takes(data, lr=self.lr, seed=self.seed, count=self.microbatch_size)

    def fit(self, train: Dataset, test: Dataset | None = None, epochs: int = 1) -> RunMetrics:
        """Train until ``epochs`` epochs are done in total; evaluate on ``test`` after each
        epoch; write the run directory if ``out`` was given. Returns the metrics."""
        check_int("epochs", epochs, 1)
        require_dataset("train", train)
        require_dataset("test", test, optional=True)
        self._check_waits(self._minibatches(train))  # fail before any work if it cannot run
        if self.epoch < epochs:  # data the model cannot take fails now, not after an epoch
            self.check_data(train)
            if test is not None:
                require_samples("test", test)
                self.check_data(test)
        run_dir = RunDirectory(self.out) if self.out is not None else None
        if run_dir is not None:
            run_dir.check_fresh(self.epoch)
        if self.epoch < epochs:
            log.info("%s", self.partition.describe())
            self._start(train)  # stage processes that cannot start fail before any file
        if run_dir is not None:
            run_dir.start(self.epoch, self.partition.to_dict(), self.settings, self.metrics.history)
        for epoch in range(self.epoch, epochs):
            started = time.perf_counter()
            result = self.train_epoch(train, epoch, epochs)
            if test is not None:
                evaluation = self.evaluate(test, stream=epoch + 1)
                result.test_loss = evaluation["loss"]
                result.test_accuracy = evaluation.get("accuracy")
            self.metrics.add_epoch(result)
            self.metrics.measured["wall_s"] += time.perf_counter() - started
            self.epoch = epoch + 1
            log.info("%s", result.summary(epochs))
            if not math.isfinite(result.train_loss):
                kept = run_dir.kept_checkpoint() if run_dir is not None else ""
                raise AimcpipeError(
                    f"training diverged in epoch {epoch + 1} (train loss {result.train_loss}); "
                    f"try a smaller optim.lr{kept}"
                )
            if run_dir is not None:
                run_dir.append_history(self.metrics.history[-1])
                due = self.checkpoint_every and self.epoch % self.checkpoint_every == 0
                if due or self.epoch == epochs:
                    run_dir.save_checkpoint(self.checkpoint_state())
        if run_dir is not None:
            head = (
                f"{self.policy} S={self.num_stages} Bm={self.microbatches} on {self.backend_name}"
            )
            run_dir.finish(self.metrics, self.state_dict(), self._epochs, head)
        return self.metrics

    # -- state -------------------------------------------------------------------------------
    def _initial_states(self) -> list[dict[str, Any]]:
        return self._builder.initial_states(lr=self.lr, seed=self.seed)

    def state_dict(self) -> dict[str, Any]:
        """The whole model's weights (stages merged), keyed as ``model.state_dict()``."""
        return self._stages.model_state(self._initial_states)

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "stages": self._stages.states(self._initial_states),
            "metrics": self.metrics.to_state(),
            "bounds": list(self.partition.bounds),
            "settings": self.settings,
        }

    def load_checkpoint(self, path: str | Path | dict[str, Any]) -> None:
        """Continue from a checkpoint written by a run with the same settings (on any
        backend: a checkpoint is one file in one format); ``path`` may also be a checkpoint
        already read with :func:`aimcpipe.runtime.checkpoint.load_checkpoint`. A checkpoint
        of another model or partition is refused before anything changes."""
        state = path if isinstance(path, dict) else load_checkpoint(path)
        stages = checkpoint_stages(state, self.partition.bounds, self._builder.all_blocks())
        for s, stage_state in enumerate(stages):  # a damaged entry is refused here, not later
            self._builder.check_state(s, stage_state, lr=self.lr, seed=self.seed)
        try:
            metrics = RunMetrics.from_state(state["metrics"])
        except Exception as exc:
            raise ConfigError(
                f"checkpoint: its metrics are damaged ({describe_exception(exc)})"
            ) from exc
        self._stages.load_states(stages)
        metrics.backend = self.backend_name  # the backend may change on resume
        metrics.cycle_s = self.cycle_s
        self.metrics = metrics
        epoch = state.get("epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"checkpoint: its epoch must be an integer >= 0, got {epoch!r}")
        self.epoch = epoch
