"""Build and run a training job from a validated ``TrainConfig`` (what ``aimcpipe train`` does).

Kept apart from the argument parsing so notebooks and scripts can call it::

    from aimcpipe.launch.train import train
    metrics = train("configs/digits-analog.yaml", out="runs/digits", overrides=["epochs=3"])

Order of work: validate the config, load the data and build the model (every error so far
leaves nothing on disk), then create the run directory and train. The directory is written
as the run goes — ``config.yaml``, ``history.jsonl`` and ``checkpoint.pt`` each epoch — and
``metrics.json`` last, so an interrupted run keeps its checkpoint for ``--resume``.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from aimcpipe.analog.convert import convert
from aimcpipe.errors import ConfigError
from aimcpipe.launch.outdir import check_out_dir, check_writable
from aimcpipe.launch.train_config import (
    TrainConfig,
    apply_overrides,
    load_config,
    parse_overrides,
)
from aimcpipe.runtime.backends import Backend
from aimcpipe.runtime.backends.torch_dist import World
from aimcpipe.runtime.checkpoint import CHECKPOINT_NAME, load_checkpoint
from aimcpipe.runtime.datasets import Dataset, load_dataset
from aimcpipe.runtime.metrics import RunMetrics
from aimcpipe.runtime.pipeline import Pipeline
from aimcpipe.scheduler import simulate
from aimcpipe.seeding import derive_seed
from aimcpipe.stages.zoo import build_model

__all__ = ["build_job", "load_data", "plan", "resolve_config", "train"]

log = logging.getLogger(__name__)

# what may change when a run is resumed: nothing that would change its numbers so far (where
# and how fast the stages run does not; threads and devices change float rounding)
RESUMABLE_KEYS = {
    "epochs",
    "checkpoint_every",
    "pipeline.backend",
    "runtime.timeout_s",
    "runtime.dist_backend",
    "runtime.unix_sockets",
    "device_time.cycle_s",
    "ray.address",
    "ray.num_cpus",
    "ray.num_gpus",
}


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, tuple | list):
        return {prefix: [_flat(v).get("", v) if isinstance(v, dict) else v for v in data]}
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


@contextlib.contextmanager
def _as_resume_error() -> Iterator[None]:
    """The API's ``checkpoint: ...`` errors, named for the flag the user typed."""
    try:
        yield
    except ConfigError as exc:
        msg = str(exc)
        if msg.startswith("checkpoint: "):
            raise ConfigError("--resume: " + msg.removeprefix("checkpoint: ")) from None
        raise


def check_unchanged(saved: Any, now: dict[str, Any], run_dir: Path) -> None:
    """Refuse to resume when a setting that changes the numbers differs from the one the
    checkpoint was written with (``config.yaml`` edited, or a checkpoint from another run)."""
    if not isinstance(saved, dict):
        return  # written through the Python API without settings: nothing to compare
    old, new = _flat(saved), _flat(now)
    for key in sorted({*old, *new}):
        if key in RESUMABLE_KEYS or any(key.startswith(k + ".") for k in RESUMABLE_KEYS):
            continue
        if old.get(key, "(unset)") != new.get(key, "(unset)"):
            raise ConfigError(
                f"--resume: {key} is {new.get(key, '(unset)')!r} in {run_dir / 'config.yaml'} "
                f"but {old.get(key, '(unset)')!r} in the run {run_dir / CHECKPOINT_NAME} was "
                f"written by; a resumed run keeps every setting but "
                f"{', '.join(sorted(RESUMABLE_KEYS))}"
            )


def resolve_config(
    config: str | Path | dict[str, Any] | None,
    overrides: Sequence[str] = (),
    resume: str | Path | None = None,
) -> TrainConfig:
    """Load (or take) the YAML data, apply ``key.path=value`` overrides, validate."""
    parsed = parse_overrides(overrides)
    if resume is not None:
        if config is not None:
            raise ConfigError("--resume: give the run directory only; its config.yaml is used")
        bad = [".".join(path) for path, _ in parsed if ".".join(path) not in RESUMABLE_KEYS]
        if bad:
            raise ConfigError(
                f"--set {bad[0]}: a resumed run keeps its config; only "
                f"{', '.join(sorted(RESUMABLE_KEYS))} may change"
            )
        run_dir = Path(resume)
        if not run_dir.is_dir():
            raise ConfigError(f"--resume: {run_dir} is not a directory")
        if not (run_dir / CHECKPOINT_NAME).is_file():
            raise ConfigError(
                f"--resume: {run_dir} has no {CHECKPOINT_NAME} to continue from "
                "(runs write one every checkpoint_every epochs and at the end)"
            )
        config = run_dir / "config.yaml"
    if config is None:
        raise ConfigError("CONFIG: give a config file (see configs/) or --resume DIR")
    data = dict(config) if isinstance(config, dict) else load_config(config)
    apply_overrides(data, parsed)
    return TrainConfig.from_dict(data)


def build_job(
    cfg: TrainConfig,
    *,
    out: Path | None = None,
    progress: bool = True,
    model: nn.Module | None = None,
    data: tuple[Dataset, Dataset] | None = None,
    backend: Backend | None = None,
) -> tuple[Pipeline, Dataset, Dataset]:
    """Data, model (converted to analog if configured) and pipeline for ``cfg``. ``data``:
    the datasets ``cfg.data`` names, when already loaded; ``backend``: a started backend to
    run the stages on instead of a new one of ``cfg.pipeline.backend``."""
    train_data, test_data = data if data is not None else load_data(cfg)
    if model is None:
        model = build_model(cfg.model.target, cfg.model.kwargs, seed=cfg.seed)
    analog = cfg.analog_config()
    if analog is not None:
        try:
            model = convert(
                model,
                analog,
                seed=derive_seed(cfg.seed, "analog"),
                exclude=cfg.model.analog_exclude,
                inplace=True,
            )
        except ConfigError as exc:
            msg = str(exc)
            if msg.startswith("exclude: "):
                raise ConfigError(f"model.analog_exclude: {msg[9:]}") from None
            raise ConfigError(f"model: {msg} (or list the layer in model.analog_exclude)") from None
    elif cfg.model.analog_exclude:
        raise ConfigError("model.analog_exclude: only meaningful with an analog section")
    p = cfg.pipeline
    example = train_data.x[: p.microbatch_size] if p.partition == "time" else None
    pipe = _pipeline(cfg, model, example, out=out, progress=progress, backend=backend)
    pipe._minibatches(train_data)  # too little data is a config error, found before any work
    pipe.check_data(train_data)  # so is a model that does not fit the data
    if pipe.partition.method == "time":
        # measured times vary: the run (and its --resume) keeps the split it measured
        pipe.settings["pipeline"]["partition"] = list(pipe.partition.counts())
    return pipe, train_data, test_data


def load_data(cfg: TrainConfig) -> tuple[Dataset, Dataset]:
    """The training and test sets ``cfg.data`` names."""
    d = cfg.data
    try:
        return load_dataset(
            d.name,
            d.root,
            seed=cfg.seed,
            limit_train=d.limit_train,
            limit_test=d.limit_test,
            **d.options,
        )
    except ConfigError as exc:
        raise ConfigError(_options_key(str(exc))) from None


def _options_key(msg: str) -> str:
    """The reader names a dataset option ``data.KEY``; in the YAML it is ``data.options.KEY``."""
    head, sep, rest = msg.partition(": ")
    if sep and head.startswith("data.") and head[5:] not in _DATA_KEYS:
        return f"data.options.{head[5:]}: {rest}"
    return msg


_DATA_KEYS = {"name", "root", "limit_train", "limit_test"}


def _pipeline(
    cfg: TrainConfig,
    model: nn.Module,
    example: Any,
    *,
    out: Path | None,
    progress: bool,
    backend: Backend | None = None,
) -> Pipeline:
    p = cfg.pipeline
    return Pipeline(
        model,
        stages=p.stages,
        partition=p.partition,
        policy=p.policy,
        microbatches=p.microbatches,
        microbatch_size=p.microbatch_size,
        lr=cfg.optim.lr,
        lr_schedule=cfg.optim.lr_schedule,
        weight_stashing=p.weight_stashing,
        seed=cfg.seed,
        costs=cfg.cost.model(),
        tile_size=p.tile_size,
        example_input=example,
        eval_batch_size=cfg.eval_batch_size,
        out=out,
        checkpoint_every=cfg.checkpoint_every,
        progress=progress,
        backend=backend if backend is not None else p.backend,
        runtime=cfg.runtime,
        cycle_s=cfg.device_time.cycle_s,
        ray=cfg.ray,
        settings=cfg.to_dict(),
    )


def plan(config: str | Path | dict[str, Any] | None, overrides: Sequence[str] = ()) -> str:
    """What a run would do, without training (``aimcpipe train --dry-run``): the data, the
    partition, and one epoch's schedule timed by the cost model."""
    cfg = resolve_config(config, overrides)
    pipe, train_data, test_data = build_job(cfg, progress=False)
    k = pipe._minibatches(train_data)
    schedule = pipe.schedule_for(k)
    sim = simulate(schedule, pipe.costs)
    per = pipe.microbatches * pipe.microbatch_size
    util = ", ".join(f"{u:.2f}" for u in sim.utilization)
    return "\n".join(
        [
            f"data: {cfg.data.name}, {len(train_data)} train / {len(test_data)} test samples; "
            f"{k} mini-batches of {pipe.microbatches}×{pipe.microbatch_size} = {per} per epoch "
            f"({len(train_data) - k * per} dropped), {cfg.epochs} epochs",
            pipe.partition.describe(),
            _describe_costs(pipe),
            f"policy {pipe.policy}: {schedule.num_actions} actions per epoch, "
            f"{sim.makespan:g} cycles per epoch ({sim.makespan * cfg.epochs:g} in all), "
            f"utilization per stage {util}",
            f"staleness {list(sim.order.staleness)}, peak stash {list(sim.order.peak_stash)} "
            "micro-batches per stage",
        ]
    )


def _describe_costs(pipe: Pipeline) -> str:
    """``cost per stage (cycles per micro-batch): F 2, 2  B 2, 2  U 2, 2 (1/1/1 per layer)``."""
    spec = pipe.cost_spec
    per_stage = pipe.costs.per_stage(pipe.num_stages)
    parts = "  ".join(
        f"{k} {', '.join(f'{c:g}' for c in v)}" for k, v in zip("FBU", per_stage, strict=True)
    )
    how = (
        f" ({spec.forward:g}/{spec.backward:g}/{spec.update:g} per layer)"
        if spec.per == "layer"
        else " (per stage)"
    )
    latency = f", latency {pipe.costs.latency:g} per message" if pipe.costs.latency else ""
    return f"cost per stage (cycles per micro-batch): {parts}{how}{latency}"


def train(
    config: str | Path | dict[str, Any] | None = None,
    *,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    resume: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> RunMetrics:
    """Run a training job; returns its metrics. ``resume`` continues the run directory of an
    interrupted (or shorter) run; ``out`` must then be omitted or the same directory."""
    cfg = resolve_config(config, overrides, resume)
    world = World.from_env()
    if world is not None and world.size > 1 and cfg.pipeline.backend != "torch":
        raise ConfigError(
            f"pipeline.backend: running under torchrun (WORLD_SIZE={world.size}) needs the "
            f"torch backend, not {cfg.pipeline.backend}; add --backend torch"
        )
    if resume is not None:
        run_dir = Path(resume)
        if out is not None and Path(out).resolve() != run_dir.resolve():
            raise ConfigError("--out: a resumed run continues in its own directory")
        if not (run_dir / CHECKPOINT_NAME).is_file():
            raise ConfigError(f"--resume: {run_dir} has no {CHECKPOINT_NAME} to continue from")
        check_writable(run_dir, "--resume")
    else:
        run_dir = check_out_dir(out, force=force, resumable_by=CHECKPOINT_NAME)
    state = None
    if resume is not None:
        with _as_resume_error():
            state = load_checkpoint(run_dir)
        check_unchanged(state.get("settings"), cfg.to_dict(), run_dir)
    pipe, train_data, test_data = build_job(cfg, out=None, progress=progress)
    if state is not None:
        with _as_resume_error():
            pipe.load_checkpoint(state)
        if pipe.epoch >= cfg.epochs:
            log.info("%s already trained %d of %d epochs", run_dir, pipe.epoch, cfg.epochs)
    elif run_dir is not None and run_dir.exists():
        shutil.rmtree(run_dir)  # --force: a fresh run must not inherit an old checkpoint
    pipe.out = run_dir
    with pipe:
        return pipe.fit(train_data, test_data, cfg.epochs)
