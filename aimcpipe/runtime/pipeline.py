"""``Pipeline``: train any torch model (analog-converted or not) with a pipeline policy.

This is the central scheduler of DESIGN.md §5 for the in-process (``local``) backend, and the
Python API the ``aimcpipe train`` command is built on::

    from aimcpipe.runtime import Pipeline, load_dataset
    from aimcpipe.stages import build_model
    from aimcpipe.analog import AnalogConfig, convert

    train, test = load_dataset("digits")
    model = convert(build_model("digits-fcn"), AnalogConfig(rule="analog-sgd"))
    pipe = Pipeline(model, stages=4, policy="async", microbatches=8, microbatch_size=8, lr=0.1)
    metrics = pipe.fit(train, test, epochs=5)
    print(metrics.final["test_accuracy"], metrics.cycles["makespan"])

Each epoch is one schedule of K mini-batches of Bm micro-batches (the last incomplete
mini-batch of an epoch is dropped; shuffling is per epoch, so every sample is used over
epochs). The async policy therefore drains at every epoch end, where the model must be
consistent for evaluation and checkpoints. ``fit(..., epochs=E)`` trains up to epoch E in
total: a pipeline restored from a checkpoint continues where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aimcpipe.errors import AimcpipeError, ConfigError
from aimcpipe.runtime.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from aimcpipe.runtime.datasets import Dataset, epoch_order
from aimcpipe.runtime.interpreter import ActionRecord, Interpreter, run_local
from aimcpipe.runtime.lr import LRSchedule
from aimcpipe.runtime.metrics import EpochResult, RunMetrics
from aimcpipe.runtime.transport import DRIVER, Key, LocalTransport
from aimcpipe.scheduler import (
    BACKWARD,
    POLICIES,
    CostModel,
    Schedule,
    build_schedule,
    simulate,
)
from aimcpipe.stages.blocks import pipeline_blocks
from aimcpipe.stages.partition import Partition
from aimcpipe.stages.partition import partition as make_partition
from aimcpipe.stages.stage import LossFn, Stage, StageCounters

__all__ = ["LOSSES", "Pipeline"]

log = logging.getLogger(__name__)

PIPELINE_POLICIES = tuple(POLICIES)  # every built-in schedule policy trains


def _half_mse(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """½·mean squared error, the least-squares objective of arXiv 2406.12774."""
    return 0.5 * F.mse_loss(y, t.to(y.dtype).reshape(y.shape))


LOSSES: dict[str, LossFn] = {"cross-entropy": F.cross_entropy, "mse": _half_mse}


class Pipeline:
    """A model cut into stages, trained under ``policy`` on the in-process backend.

    ``stages``/``partition``: how to cut the model's blocks (see
    :func:`aimcpipe.stages.partition`); ``microbatches`` (Bm) micro-batches of
    ``microbatch_size`` samples make a mini-batch. ``loss`` is ``"cross-entropy"``,
    ``"mse"``, a callable, or None to pick by the dataset's task. ``out`` is the run
    directory (DESIGN.md §6); ``checkpoint_every`` epochs a checkpoint is written there.
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
        timeout: float = 300.0,
        settings: dict[str, Any] | None = None,
    ) -> None:
        if policy not in PIPELINE_POLICIES:
            raise ConfigError(
                f"pipeline.policy: {policy!r} is not a policy; allowed: "
                + ", ".join(PIPELINE_POLICIES)
            )
        for name, value in (("microbatches", microbatches), ("microbatch_size", microbatch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"pipeline.{name}: must be an integer >= 1, got {value!r}")
        if not (isinstance(lr, int | float) and 0 < lr < math.inf):
            raise ConfigError(f"optim.lr: must be a number > 0, got {lr!r}")
        if weight_stashing and policy != "async":
            raise ConfigError("pipeline.weight_stashing: only the async policy stashes weights")
        if isinstance(loss, str) and loss not in LOSSES:
            raise ConfigError(f"loss: {loss!r} is not a loss; allowed: {', '.join(LOSSES)}")
        self.model = model
        blocks = pipeline_blocks(model)
        if stages is None and isinstance(partition, str):
            stages = 1  # a named method needs a count; lists and callables bring their own
        if isinstance(stages, int) and not isinstance(stages, bool) and stages > len(blocks):
            names = ", ".join(name for name, _ in blocks)
            raise ConfigError(
                f"pipeline.stages: {stages} stages but the model has only {len(blocks)} "
                f"blocks ({names})"
            )
        try:
            self.partition: Partition = make_partition(
                blocks, stages, partition, tile_size=tile_size, example_input=example_input
            )
        except ConfigError as exc:  # the partitioner names its own argument "partition"
            msg = str(exc)
            if msg.startswith("partition: "):
                msg = "pipeline." + msg
            raise ConfigError(msg) from None
        self.policy = policy
        self.microbatches = microbatches
        self.microbatch_size = microbatch_size
        self.lr = float(lr)
        self.lr_schedule = lr_schedule or LRSchedule()
        self.weight_stashing = weight_stashing
        self.seed = seed
        self.costs = costs or CostModel()
        self.eval_batch_size = eval_batch_size
        self.out = Path(out) if out is not None else None
        self.checkpoint_every = checkpoint_every
        self.progress = progress
        self.timeout = timeout
        self.settings = settings
        self._loss: LossFn | None = LOSSES[loss] if isinstance(loss, str) else loss
        num = self.partition.num_stages
        self.stages = [
            Stage(
                s,
                num,
                [blocks[i] for i in range(self.partition.bounds[s], self.partition.bounds[s + 1])],
                lr=self.lr,
                loss_fn=self._compute_loss if s == num - 1 else None,
                seed=seed,
                weight_stashing=weight_stashing,
            )
            for s in range(num)
        ]
        self.epoch = 0
        self.metrics = RunMetrics.new(
            policy=policy,
            backend="local",
            stages=num,
            microbatches=microbatches,
            microbatch_size=microbatch_size,
        )
        self._trace: list[list[ActionRecord]] | None = None

    # -- loss ----------------------------------------------------------------------------
    def _compute_loss(self, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        assert self._loss is not None
        return self._loss(y, target)

    def _pick_loss(self, data: Dataset) -> None:
        if self._loss is None:
            self._loss = LOSSES["cross-entropy" if data.task == "classification" else "mse"]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    # -- training --------------------------------------------------------------------------
    def schedule_for(self, minibatches: int) -> Schedule:
        options = {"weight_stashing": True} if self.weight_stashing else {}
        return build_schedule(
            self.policy, self.num_stages, self.microbatches, minibatches, **options
        )

    def _minibatches(self, data: Dataset) -> int:
        per = self.microbatches * self.microbatch_size
        k = len(data) // per
        if k < 1:
            raise ConfigError(
                f"data: {len(data)} training samples are fewer than one mini-batch "
                f"(pipeline.microbatches {self.microbatches} × pipeline.microbatch_size "
                f"{self.microbatch_size} = {per})"
            )
        return k

    def train_epoch(self, data: Dataset, epoch: int, epochs: int | None = None) -> EpochResult:
        """Run one epoch's schedule over ``data`` (shuffled by seed and epoch); ``epochs``
        only labels the progress bar."""
        self._pick_loss(data)
        k = self._minibatches(data)
        schedule = self.schedule_for(k)
        lr = self.lr_schedule.lr_at(self.lr, epoch)
        order = epoch_order(len(data), self.seed, epoch)
        b = self.microbatch_size

        def feed(key: Key) -> torch.Tensor:
            kind, n, _, _ = key
            idx = order[n * b : (n + 1) * b]
            return data.x[idx] if kind == "input" else data.y[idx]

        transport = LocalTransport(feed)
        for stage in self.stages:
            stage.lr = lr
        for stage in self.stages:
            stage.counters = StageCounters()
        origin = time.perf_counter()
        interpreters = [
            Interpreter(stage, schedule.stages[s], transport, timeout=self.timeout, origin=origin)
            for s, stage in enumerate(self.stages)
        ]
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            label = f"epoch {epoch + 1}" + (f"/{epochs}" if epochs else "")
            bar = tqdm(total=k, desc=label, unit="mini-batch", leave=False)
        last = self.num_stages - 1
        done_backwards = 0

        def on_action(action: Any) -> None:
            nonlocal done_backwards
            if action.kind == BACKWARD and action.stage == last:
                done_backwards += 1
                if done_backwards % self.microbatches == 0:
                    bar.update(1)

        run_local(interpreters, on_action if bar is not None else None)
        wall = time.perf_counter() - origin
        if bar is not None:
            bar.close()
        stats = transport.take_all("stats", DRIVER)
        executed = Schedule(
            self.policy,
            [[r.action for r in it.records] for it in interpreters],
            self.microbatches,
            k,
            weight_stashing=self.weight_stashing,
        )
        sim = simulate(executed, self.costs)
        records = [it.records for it in interpreters]
        if self._trace is None:
            self._trace = records
        counters = [stage.counters for stage in self.stages]
        return EpochResult.from_run(
            epoch=epoch,
            lr=lr,
            stats=[stats[n] for n in sorted(stats)],
            records=records,
            wall_s=wall,
            sim=sim,
            counters=counters,
            bytes_sent=[transport.bytes_sent.get(s, 0) for s in range(self.num_stages)],
        )

    @torch.no_grad()
    def evaluate(self, data: Dataset, stream: int | None = None) -> dict[str, float]:
        """Mean loss (and accuracy for classification) of the current model on ``data``.

        Evaluation draws its IO noise from streams of its own (``stream``, by default the
        number of epochs trained), so it never changes training (see ``Stage.evaluation``)."""
        self._pick_loss(data)
        stream = self.epoch if stream is None else stream
        total_loss = 0.0
        correct = 0
        with contextlib.ExitStack() as stack:
            for stage in self.stages:
                stack.enter_context(stage.evaluation(stream))
            starts = range(0, len(data), self.eval_batch_size)
            if self.progress and len(starts) > 4:
                from tqdm.auto import tqdm

                starts = tqdm(starts, desc="evaluating", unit="chunk", leave=False)
            for start in starts:
                x = data.x[start : start + self.eval_batch_size]
                t = data.y[start : start + self.eval_batch_size]
                for stage in self.stages:
                    x = stage.infer(x)
                total_loss += float(self._compute_loss(x, t)) * len(t)
                if data.task == "classification":
                    correct += int((x.argmax(dim=1) == t).sum())
        out = {"loss": total_loss / len(data)}
        if data.task == "classification":
            out["accuracy"] = correct / len(data)
        return out

    def check_data(self, data: Dataset) -> None:
        """Run one micro-batch through every stage and the loss (on evaluation streams, so
        training is unchanged): a model that does not fit the data fails here, before any
        file is written, with one line naming the stage."""
        self._pick_loss(data)
        x = data.x[: self.microbatch_size]
        t = data.y[: self.microbatch_size]
        with contextlib.ExitStack() as stack, torch.no_grad():
            for stage in self.stages:
                stack.enter_context(stage.evaluation(-1))
            for stage in self.stages:
                try:
                    x = stage.infer(x)
                except Exception as exc:
                    raise ConfigError(
                        f"model: stage {stage.index} ({', '.join(stage.names)}) cannot take "
                        f"the data (input {tuple(x.shape)} from {data.name}): "
                        f"{type(exc).__name__}: {exc}".replace("\n", " ")
                    ) from None
            try:
                self._compute_loss(x, t)
            except Exception as exc:
                raise ConfigError(
                    f"model: its output {tuple(x.shape)} does not fit the {data.task} targets "
                    f"{tuple(t.shape)} of {data.name}: {type(exc).__name__}: {exc}".replace(
                        "\n", " "
                    )
                ) from None

    def fit(self, train: Dataset, test: Dataset | None = None, epochs: int = 1) -> RunMetrics:
        """Train until ``epochs`` epochs are done in total; evaluate on ``test`` after each
        epoch; write the run directory if ``out`` was given. Returns the metrics."""
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise ConfigError(f"epochs: must be an integer >= 1, got {epochs!r}")
        self._minibatches(train)  # fail before any work if the data cannot fill a mini-batch
        if self.epoch < epochs:
            log.info("%s", self.partition.describe())
        if self.out is not None:
            self._write_start()
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
                kept = (
                    f"; {self.out / CHECKPOINT_NAME} holds the last checkpoint" if self.out else ""
                )
                raise AimcpipeError(
                    f"training diverged in epoch {epoch + 1} (train loss {result.train_loss}); "
                    f"try a smaller optim.lr{kept}"
                )
            if self.out is not None:
                self._append_history()
                due = self.checkpoint_every and self.epoch % self.checkpoint_every == 0
                if due or self.epoch == epochs:
                    save_checkpoint(self.out / CHECKPOINT_NAME, self.checkpoint_state())
        if self.out is not None:
            self._write_end()
        return self.metrics

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The whole model's weights (stages merged), keyed as ``model.state_dict()``."""
        merged: dict[str, Any] = {}
        for stage in self.stages:
            merged.update(stage.model_state())
        return merged

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "stages": [stage.state_dict() for stage in self.stages],
            "metrics": self.metrics.to_state(),
            "bounds": list(self.partition.bounds),
            "settings": self.settings,
        }

    def load_checkpoint(self, path: str | Path) -> None:
        """Continue from a checkpoint written by a run with the same settings."""
        state = load_checkpoint(path)
        if list(state["bounds"]) != list(self.partition.bounds):
            raise ConfigError(
                f"--resume: the checkpoint's partition {state['bounds']} differs from this "
                f"run's {list(self.partition.bounds)}"
            )
        for stage, stage_state in zip(self.stages, state["stages"], strict=True):
            stage.load_state_dict(stage_state)
        self.metrics = RunMetrics.from_state(state["metrics"])
        self.epoch = int(state["epoch"])

    # -- run directory -----------------------------------------------------------------------
    def _write_start(self) -> None:
        assert self.out is not None
        if self.epoch == 0 and self.out.is_dir() and any(self.out.iterdir()):
            raise ConfigError(
                f"out: {self.out} is not empty; give a new directory (or load_checkpoint it "
                "to continue that run)"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        # until this run finishes, the directory must not look complete
        (self.out / "metrics.json").unlink(missing_ok=True)
        (self.out / "partition.json").write_text(
            json.dumps(self.partition.to_dict(), indent=2) + "\n"
        )
        if self.settings is not None:
            import yaml

            (self.out / "config.yaml").write_text(yaml.safe_dump(self.settings, sort_keys=False))
        # the history of a resumed run is what its checkpoint saw, not what came after
        lines = [json.dumps(h) for h in self.metrics.history]
        (self.out / "history.jsonl").write_text("".join(line + "\n" for line in lines))

    def _append_history(self) -> None:
        assert self.out is not None
        with (self.out / "history.jsonl").open("a") as fh:
            fh.write(json.dumps(self.metrics.history[-1]) + "\n")

    def _write_end(self) -> None:
        from aimcpipe.runtime.rundir import write_results

        assert self.out is not None
        write_results(
            self.out,
            metrics=self.metrics,
            model_state=self.state_dict(),
            trace=self._trace,
            label=f"{self.policy} S={self.num_stages} Bm={self.microbatches} (first epoch)",
        )
