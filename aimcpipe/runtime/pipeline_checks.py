"""The checks a :class:`~aimcpipe.runtime.Pipeline` makes before any work.

Each refuses a bad value at once with a one-line :class:`~aimcpipe.errors.ConfigError`
naming the parameter by its config key and what is allowed: the constructor's arguments
(:func:`check_arguments`, then :func:`check_backend`), the cut of the model into stages
(:func:`cut_model`), the cost model (:func:`stage_costs`) and the datasets given to its
methods (:func:`require_dataset`). They are plain functions: they read nothing but their
arguments and change nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aimcpipe.dataconf import check_int
from aimcpipe.errors import ConfigError
from aimcpipe.runtime.backends import Backend
from aimcpipe.runtime.datasets import Dataset
from aimcpipe.runtime.losses import check_loss
from aimcpipe.runtime.lr import LRSchedule
from aimcpipe.runtime.options import BACKENDS, DeviceTime, RayOptions, RuntimeOptions
from aimcpipe.scheduler import POLICIES, CostModel
from aimcpipe.stages.blocks import pipeline_blocks
from aimcpipe.stages.partition import Partition
from aimcpipe.stages.partition import partition as make_partition
from aimcpipe.stages.stage import LossFn

__all__ = [
    "PIPELINE_POLICIES",
    "check_arguments",
    "check_backend",
    "check_type",
    "cut_model",
    "require_dataset",
    "require_samples",
    "stage_costs",
]

PIPELINE_POLICIES = tuple(POLICIES)  # every built-in schedule policy trains


def check_type(name: str, value: Any, kind: type, what: str) -> None:
    if not isinstance(value, kind):
        raise ConfigError(f"{name}: must be {what}, got {value!r}")


def require_dataset(name: str, data: object, optional: bool = False) -> None:
    """A clear error for anything but a Dataset given as ``name`` (None where optional)."""
    if optional and data is None:
        return
    if not isinstance(data, Dataset):
        allowed = "an aimcpipe Dataset" + (" or None" if optional else "")
        raise ConfigError(
            f"{name}: must be {allowed} (load_dataset returns them; "
            f"Dataset(name, x, y, task, num_classes) wraps tensors), got {type(data).__name__}"
        )


def require_samples(name: str, data: Dataset) -> None:
    """A dataset to evaluate on must hold samples."""
    if len(data) == 0:
        raise ConfigError(f"{name}: the dataset {data.name!r} holds no samples")


def check_arguments(
    *,
    policy: str,
    microbatches: int,
    microbatch_size: int,
    lr: float,
    seed: int,
    eval_batch_size: int,
    checkpoint_every: int,
    weight_stashing: bool,
    progress: bool,
    lr_schedule: LRSchedule | None,
    out: str | Path | None,
) -> None:
    """Check the constructor's training arguments, in this order (before
    :func:`check_backend`)."""
    if policy not in PIPELINE_POLICIES:
        raise ConfigError(
            f"pipeline.policy: {policy!r} is not a policy; allowed: " + ", ".join(PIPELINE_POLICIES)
        )
    for name, value in (("microbatches", microbatches), ("microbatch_size", microbatch_size)):
        check_int(f"pipeline.{name}", value, 1)
    if not (isinstance(lr, int | float) and 0 < lr < math.inf):
        raise ConfigError(f"optim.lr: must be a number > 0, got {lr!r}")
    for name, value, low in (
        ("seed", seed, 0),
        ("eval_batch_size", eval_batch_size, 1),
        ("checkpoint_every", checkpoint_every, 0),
    ):
        check_int(name, value, low)
    for name, value in (("pipeline.weight_stashing", weight_stashing), ("progress", progress)):
        check_type(name, value, bool, "true or false")
    if lr_schedule is not None:
        check_type("optim.lr_schedule", lr_schedule, LRSchedule, "an LRSchedule")
    if out is not None:
        check_type("out", out, str | Path, "a directory path")
        if not str(out).strip():
            raise ConfigError("out: give a directory name (an empty path is not one)")
        if Path(out).exists() and not Path(out).is_dir():
            raise ConfigError(f"out: {out} exists and is not a directory")
    if weight_stashing and policy != "async":
        raise ConfigError("pipeline.weight_stashing: only the async policy stashes weights")


def check_backend(
    backend: str | Backend,
    runtime: RuntimeOptions | None,
    ray: RayOptions | None,
    cycle_s: float | None,
    loss: str | LossFn | None,
) -> tuple[RuntimeOptions, RayOptions]:
    """Check where and how the stages would run (the backend, its options, the emulated
    device time, a loss that must travel to other processes), in this order; return the
    runtime and Ray options with their defaults filled in."""
    if not isinstance(backend, Backend) and backend not in BACKENDS:
        raise ConfigError(
            f"pipeline.backend: {backend!r} is not a backend; allowed: {', '.join(BACKENDS)}"
        )
    runtime = runtime if runtime is not None else RuntimeOptions()
    check_type("runtime", runtime, RuntimeOptions, "a RuntimeOptions")
    ray = ray if ray is not None else RayOptions()
    check_type("ray", ray, RayOptions, "a RayOptions")
    try:
        DeviceTime(cycle_s)
    except ConfigError as exc:
        raise ConfigError(f"device_time.{exc}") from None
    remote = isinstance(backend, Backend) or backend != "local"
    check_loss(loss, remote=remote)
    if backend == "ray":
        from aimcpipe.runtime.backends.ray_actors import require_ray

        require_ray()
    if backend == "local" and runtime.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device: 'cuda' asked for but CUDA is not available here")
    return runtime, ray


def cut_model(
    model: nn.Module,
    stages: int | None,
    partition: str | Sequence[int] | Sequence[str] | Callable[..., Any],
    *,
    tile_size: int,
    example_input: torch.Tensor | None,
) -> tuple[list[tuple[str, nn.Module]], Partition]:
    """The model's pipeline blocks and their cut into stages (see
    :func:`aimcpipe.stages.partition`), with errors named by their ``pipeline.`` keys."""
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
        cut = make_partition(
            blocks, stages, partition, tile_size=tile_size, example_input=example_input
        )
    except ConfigError as exc:  # the partitioner names its own argument "partition"
        msg = str(exc)
        if msg.startswith("partition: "):
            msg = "pipeline." + msg
        raise ConfigError(msg) from None
    return blocks, cut


def stage_costs(costs: CostModel | None, partition: Partition) -> tuple[CostModel, CostModel]:
    """The cost model as given (by default ``CostModel(per="layer")``) and what it charges
    each stage of ``partition``."""
    spec = costs if costs is not None else CostModel(per="layer")
    check_type("costs", spec, CostModel, "a CostModel")
    try:
        per_stage = spec.for_layers(partition.layers or ())
        per_stage.per_stage(partition.num_stages)
    except ConfigError as exc:
        raise ConfigError(f"cost.{exc}") from None
    return spec, per_stage
