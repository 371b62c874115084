"""The ``aimcpipe train`` YAML schema: dataclasses with documented defaults, validated on load.

Every unknown key, wrong type or impossible value is a one-line ``ConfigError`` naming the
key path (``pipeline.microbatches: must be an integer >= 1, got 0``). ``--set key.path=value``
overrides are applied to the plain YAML data *before* validation, so they are checked the
same way. A full example with every key is ``configs/digits-analog.yaml``.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from aimcpipe.analog.config import AnalogConfig
from aimcpipe.dataconf import from_dict, to_dict
from aimcpipe.errors import ConfigError, UserCodeError
from aimcpipe.launch.flags import check_size
from aimcpipe.runtime.lr import LRSchedule
from aimcpipe.runtime.options import DeviceTime, RayOptions, RuntimeOptions
from aimcpipe.scheduler import CostModel

__all__ = [
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "PipelineConfig",
    "TrainConfig",
    "apply_overrides",
    "check_run_size",
    "load_config",
    "num_stages",
    "parse_overrides",
]


FLOAT32_MAX = 3.4028234663852886e38


def _at_least(path: str, value: Any, minimum: int) -> None:
    if value is not None and value < minimum:
        raise ConfigError(f"{path}: must be >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The model to train: a zoo model by ``name`` or a user ``factory`` by import path
    (give exactly one of the two)."""

    name: str | None = None
    """A zoo model: ``lsq``, ``fcn``, ``digits-fcn``, ``lenet``, ``resnet10`` or
    ``resnet18``."""
    factory: str | None = None
    """A user model factory by import path, ``"my_pkg.models:build"``."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments the zoo model or the factory is called with."""
    analog_exclude: list[str] = field(default_factory=list)
    """Layers (qualified names) that stay digital."""

    def __post_init__(self) -> None:
        if (self.name is None) == (self.factory is None):
            raise ConfigError("name: give exactly one of model.name or model.factory")
        if self.factory is not None and ":" not in self.factory:
            raise ConfigError(
                f"factory: {self.factory!r} is not an import path; write 'package.module:function'"
            )

    @property
    def target(self) -> str:
        return self.name if self.name is not None else str(self.factory)


@dataclass(frozen=True)
class DataConfig:
    """The dataset to train and test on."""

    name: str = "digits"
    """``lsq`` (synthetic), ``digits`` (scikit-learn, offline), ``mnist`` (folder of IDX
    files) or ``cifar10`` (folder of python batches)."""
    root: str | None = None
    """The folder holding the dataset's files (``mnist``, ``cifar10``)."""
    limit_train: int | None = None
    """Keep only the first this many training samples (quick runs); null: all."""
    limit_test: int | None = None
    """Keep only the first this many test samples (quick runs); null: all."""
    options: dict[str, Any] = field(default_factory=dict)
    """Options passed to the dataset reader (e.g. ``test_fraction`` for digits)."""


@dataclass(frozen=True)
class PipelineConfig:
    """How the model is cut and scheduled, and where the stages run. A mini-batch is
    ``microbatches`` × ``microbatch_size`` samples."""

    backend: Literal["local", "torch", "ray"] = "local"
    """Where the stages run: ``local`` (every stage in one process), ``torch`` (one process
    per stage) or ``ray`` (one actor per stage)."""
    policy: Literal["wop", "sync-1f1b", "async", "gpipe"] = "sync-1f1b"
    """The schedule policy."""
    stages: int | None = None
    """The number of pipeline stages (null: 1, or as many as an explicit ``partition``
    list gives)."""
    partition: str | list[int] | list[str] = "uniform"
    """How the model's blocks are cut into stages: ``uniform``, ``params``, ``tiles``,
    ``time``, a list of blocks per stage (``[2, 1, 1]``) or the names of the first block of
    stages 1.. (``[fc3]``)."""
    tile_size: int = 512
    """The side of a crossbar tile (rows = columns) with which a block's tiles are counted,
    for ``partition: tiles`` and the partition table."""
    microbatches: int = 4
    """Micro-batches per mini-batch (Bm)."""
    microbatch_size: int = 16
    """Samples per micro-batch."""
    weight_stashing: bool = False
    """Async only: a micro-batch's backward uses the weights of its forward."""

    def __post_init__(self) -> None:
        _at_least("stages", self.stages, 1)
        _at_least("tile_size", self.tile_size, 1)
        _at_least("microbatches", self.microbatches, 1)
        _at_least("microbatch_size", self.microbatch_size, 1)
        if self.weight_stashing and self.policy != "async":
            raise ConfigError("weight_stashing: only the async policy stashes weights")


@dataclass(frozen=True)
class OptimConfig:
    """SGD learning rate (analog updates and digital parameters alike) and its schedule."""

    lr: float = 0.1
    """The SGD learning rate (> 0), of analog updates and digital parameters alike."""
    lr_schedule: LRSchedule = field(default_factory=LRSchedule)
    """How the learning rate changes from epoch to epoch."""

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr!r}")
        if not self.lr <= FLOAT32_MAX:  # every product with it would overflow the weights
            raise ConfigError(f"lr: must be at most {FLOAT32_MAX:.3g} (float32), got {self.lr!r}")


@dataclass(frozen=True)
class CostConfig:
    """Cycles per action for the cost model (docs/design.md §4); default AIMC F = B = U = 1
    per layer: a stage is charged for the Linear/Conv2d layers it holds (``per: layer``).
    ``per: stage`` charges every stage alike, or by per-stage lists (``forward: [2, 1]``)."""

    forward: int | float | list[int | float] = 1
    """Cycles of a forward (F) per micro-batch; a list gives one value per stage."""
    backward: int | float | list[int | float] = 1
    """Cycles of a backward (B) per micro-batch; a list gives one value per stage."""
    update: int | float | list[int | float] = 1
    """Cycles of an update (U) per micro-batch it applies; a list gives one value per
    stage."""
    latency: int | float = 0
    """Cycles a message between neighbouring stages is in flight."""
    per: Literal["layer", "stage"] = "layer"
    """``layer``: the costs are per Linear/Conv2d layer and a stage pays for the layers it
    holds; ``stage``: every stage pays them alike (or by the per-stage lists)."""

    def model(self) -> CostModel:
        return CostModel(
            forward=self.forward,  # type: ignore[arg-type]
            backward=self.backward,  # type: ignore[arg-type]
            update=self.update,  # type: ignore[arg-type]
            latency=self.latency,
            per=self.per,
        )

    def __post_init__(self) -> None:
        try:
            self.model()
        except ConfigError as exc:
            raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run. ``runtime``, ``device_time`` and ``ray`` say how the stages run
    (see :mod:`aimcpipe.runtime.options`); of those, only ``runtime.threads`` and
    ``runtime.device`` can change the numbers (float rounding, random streams)."""

    model: ModelConfig
    """The model to train (required)."""
    data: DataConfig = field(default_factory=DataConfig)
    """The dataset."""
    analog: dict[str, Any] | None = None
    """An ``AnalogConfig``: every Linear/Conv2d becomes an analog layer with it; null trains
    the torch model digitally (plain SGD)."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """How the model is cut and scheduled, and where the stages run."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """The learning rate and its schedule."""
    cost: CostConfig = field(default_factory=CostConfig)
    """The cost model's cycles per action."""
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    """How every backend runs its stages."""
    device_time: DeviceTime = field(default_factory=DeviceTime)
    """Emulated accelerator time."""
    ray: RayOptions = field(default_factory=RayOptions)
    """The Ray backend."""
    epochs: int = 1
    """Epochs to train (in total, a resumed run included)."""
    seed: int = 0
    """The run's seed: the model's initial weights, the analog layers' draws and the data's
    sample order derive from it."""
    checkpoint_every: int = 1
    """Write a checkpoint every this many epochs (0: only at the end)."""
    eval_batch_size: int = 256
    """Samples per evaluation chunk (does not change training)."""

    def __post_init__(self) -> None:
        _at_least("epochs", self.epochs, 1)
        _at_least("checkpoint_every", self.checkpoint_every, 0)
        _at_least("eval_batch_size", self.eval_batch_size, 1)
        if self.analog is not None:
            self.analog_config()  # validate now, with the key path

    def analog_config(self) -> AnalogConfig | None:
        if self.analog is None:
            return None
        return AnalogConfig.from_dict(self.analog, path="analog")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        if not isinstance(data, Mapping):
            raise ConfigError(f"config: expected a mapping at the top level, got {data!r}")
        if "model" not in data:
            raise ConfigError("model: required (e.g. model: {name: digits-fcn})")
        return from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the resolved ``config.yaml`` of a run: every default filled in, IO
        presets expanded)."""
        data = to_dict(self)
        analog = self.analog_config()
        if analog is not None:
            data["analog"] = to_dict(analog)
        return data


class _Loader(yaml.SafeLoader):
    """YAML 1.1 (PyYAML) reads ``1e-3`` as a string; configs write learning rates that way, so
    numbers with an exponent and no dot are floats here, as in YAML 1.2 and Python. YAML 1.1's
    base-60 numbers are not: ``1:30`` stays the string it looks like, not 90."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

_BASE_60 = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
_Loader.yaml_implicit_resolvers = {
    first: ([("tag:yaml.org,2002:str", _BASE_60)] if first in "-+0123456789" else []) + list(rules)
    for first, rules in _Loader.yaml_implicit_resolvers.items()
}  # the str rule comes first, so base-60 never reaches the int and float rules


class _DuplicateKey(yaml.YAMLError):
    """A mapping that names one key twice (PyYAML would keep the later value silently)."""

    def __init__(self, path: str, first: int, second: int) -> None:
        where = f"lines {first} and {second}" if first != second else f"both on line {first}"
        super().__init__(f"{path}: given twice ({where}); keep one")


def _check_duplicates(node: yaml.Node, path: str, seen: set[int]) -> None:
    if id(node) in seen:  # an alias of a node already checked
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            name = str(key.value) if isinstance(key, yaml.ScalarNode) else None
            child = f"{path}.{name}" if path else str(name)
            if name is not None and key.tag != "tag:yaml.org,2002:merge":
                line = key.start_mark.line + 1
                if (key.tag, name) in lines:
                    raise _DuplicateKey(child, lines[key.tag, name], line)
                lines[key.tag, name] = line
            _check_duplicates(value, child, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, f"{path}[{i}]", seen)


def _yaml(text: str) -> Any:
    loader = _Loader(text)  # a SafeLoader subclass: no arbitrary objects
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicates(node, "", set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_config(path: str | Path) -> dict[str, Any]:
    """The plain YAML data of a config file (validate with ``TrainConfig.from_dict``)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"CONFIG: {path} is a directory; give a YAML file (see configs/)")
    if path.exists() and not path.is_file():
        raise ConfigError(f"CONFIG: {path} is not a regular file; give a YAML file")
    if not path.is_file():
        raise ConfigError(f"CONFIG: {path} does not exist (see configs/ for examples)")
    try:
        data = _yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"CONFIG: {path} is not a text file (YAML in UTF-8)") from None
    except OSError as exc:
        raise ConfigError(f"CONFIG: cannot read {path}: {exc.strerror or exc}") from None
    except _DuplicateKey as exc:
        raise ConfigError(f"CONFIG: {path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"CONFIG: {path}{where} is not valid YAML") from None
    if data is None:
        raise ConfigError(f"CONFIG: {path} is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"CONFIG: {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def parse_overrides(items: Sequence[str]) -> list[tuple[list[str], Any]]:
    """``["pipeline.stages=4", "analog.device.tau=0.5"]`` -> key paths and YAML values."""
    out = []
    for item in items:
        key, eq, text = item.partition("=")
        path = key.strip().split(".")
        if not eq or not all(path):
            raise ConfigError(f"--set: cannot read {item!r}; write key.path=value (e.g. epochs=5)")
        try:
            value = _yaml(text) if text.strip() else None
        except _DuplicateKey as exc:
            raise ConfigError(f"--set: {key}={text!r}: {exc}") from None
        except yaml.YAMLError:
            raise ConfigError(f"--set: {key}={text!r} is not a YAML value") from None
        out.append((path, value))
    return out


def apply_overrides(data: dict[str, Any], overrides: Sequence[tuple[list[str], Any]]) -> None:
    """Set each key path in ``data`` (creating mappings on the way)."""
    for path, value in overrides:
        node = data
        for i, key in enumerate(path[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise ConfigError(f"--set: {where} is {child!r}, not a mapping of keys")
            node = child
        node[path[-1]] = value


# ---- the size of a run, estimated before anything is built or trained --------------------
#
# Lower bounds, so that nothing that would finish is refused: a pipeline action costs at
# least 10 µs of the runtime's own work (measured: 20-31 µs on a 2-core Xeon,
# benchmarks/pipeline_overhead.py), a multiply-add at least 1e-13 s (a GPU's rate), and a
# model at least 8 bytes per weight (its float32 weights and one working copy of that size).
SECONDS_PER_ACTION = 1e-5
MACS_PER_SECOND = 1e13
BYTES_PER_WEIGHT = 8


def num_stages(cfg: TrainConfig, stages: int | None = None) -> int:
    """The stage count a run of ``cfg`` will have (``stages`` overrides the config's)."""
    if stages is None:
        stages = cfg.pipeline.stages
    partition = cfg.pipeline.partition
    if stages is None and isinstance(partition, list) and partition:
        # block counts per stage, or the first blocks of stages 1..
        return len(partition) + (isinstance(partition[0], str))
    return stages or 1


def _model_size(cfg: TrainConfig) -> tuple[int, int, int] | None:
    """(weights, multiply-adds per sample at least, Linear/Conv2d layers) of the config's
    model, counted on torch's meta device (nothing is allocated); None when the model cannot
    be built there (a factory that needs real tensors)."""
    import torch
    from torch import nn

    from aimcpipe.stages.zoo import build_model

    try:
        with torch.device("meta"):
            model = build_model(cfg.model.target, cfg.model.kwargs, seed=cfg.seed)
    except UserCodeError:  # e.g. a factory that needs real tensors: the real build reports
        return None
    except ConfigError:
        raise
    except Exception:  # the real build reports it, with its own message
        return None
    weights = sum(t.numel() for t in model.parameters()) + sum(t.numel() for t in model.buffers())
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    macs = sum(m.weight.numel() for m in layers)  # each weight is used at least once a sample
    return weights, macs, len(layers)


def _cycles(cfg: TrainConfig, stages: int, layers: int) -> float:
    """Cycles of the busiest stage per micro-batch, at least (F + B + U)."""
    cost = cfg.cost
    if cost.per == "layer":
        total = sum(float(v) for v in (cost.forward, cost.backward, cost.update))  # type: ignore[arg-type]
        return total * layers / stages
    per_stage = [
        v if isinstance(v, list) else [v] * stages
        for v in (cost.forward, cost.backward, cost.update)
    ]
    return max(sum(float(v[s]) for v in per_stage) for s in range(min(map(len, per_stage))))


def check_run_size(
    cfg: TrainConfig,
    *,
    train_samples: int,
    runs: Sequence[tuple[str, int]] | None = None,
    names: Mapping[str, str] | None = None,
) -> None:
    """Refuse, before any work, a run (or a sweep of ``runs``, (policy, stages) pairs) that
    would not fit in this machine's memory or would run for more than the limit of
    :func:`aimcpipe.launch.flags.check_size`. ``names`` maps a config key to what the user
    typed for it (``{"epochs": "--epochs"}``), so the message names that."""
    names = dict(names or {})
    threads = cfg.runtime.threads
    most = max(64, 4 * (os.cpu_count() or 1))
    if threads > most:
        raise ConfigError(
            f"runtime.threads: {threads} threads per stage is more than {most} (4 per core "
            f"of this machine's {os.cpu_count()}, and at least 64)"
        )
    if cfg.runtime.timeout_s > threading.TIMEOUT_MAX:
        raise ConfigError(
            f"runtime.timeout_s: {cfg.runtime.timeout_s:g} s is more than the longest wait "
            f"this system allows ({threading.TIMEOUT_MAX:.3g} s)"
        )
    size = _model_size(cfg)
    if size is None:
        return
    weights, macs, layers = size
    kwargs = "model.kwargs" if cfg.model.kwargs else "model"
    check_size(
        names.get(kwargs, kwargs),
        f"{cfg.model.target} with {weights:,} weights",
        BYTES_PER_WEIGHT * weights,
        0,
    )
    if runs is None:
        runs = [(cfg.pipeline.policy, num_stages(cfg))]
    p = cfg.pipeline
    per_minibatch = p.microbatches * p.microbatch_size
    minibatches = train_samples // per_minibatch
    if minibatches == 0:
        return  # the data set cannot fill one mini-batch: the config's own check says so
    cycle_s = cfg.device_time.cycle_s
    emulated = host = 0.0
    for _, stages in runs:
        actions = stages * minibatches * (2 * p.microbatches + 1)  # F, B per micro-batch, a U
        host += (
            actions * SECONDS_PER_ACTION + 3 * macs * minibatches * per_minibatch / MACS_PER_SECOND
        )
        if cycle_s is not None:
            cycles = _cycles(cfg, stages, layers) * p.microbatches * minibatches
            emulated += (cycles + (stages - 1) * float(cfg.cost.latency)) * cycle_s
    epochs = names.get("epochs", "epochs")
    what = f"{cfg.epochs:,} epochs of {minibatches:,} mini-batch{'es' if minibatches > 1 else ''}"
    if len(runs) > 1:
        what += f" in each of {len(runs)} runs"
    flags = epochs
    if emulated > host:
        flags = f"{names.get('device_time.cycle_s', 'device_time.cycle_s')}/{epochs}"
        what += f" at {cycle_s:g} s per cycle"
    check_size(flags, what, 0, cfg.epochs * max(emulated, host))
