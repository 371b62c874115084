"""Measured speedup vs stage count (what ``aimcpipe speedup`` does).

A *sweep* trains the same model, data and seed once per (policy, stage count) and compares
every run with the baseline, wop on one stage, on the same backend::

    from aimcpipe.launch.speedup import plan_sweep, run_sweep
    sweep = plan_sweep("configs/digits-analog.yaml", stages=[1, 2, 4], backend="torch",
                       cycle_s=0.002)
    records = run_sweep(sweep, "runs/speedup")

For each run:

* ``measured_speedup``: the baseline's measured makespan over this run's. The makespan is the
  seconds the stages spent running their schedules (first action start to last action end,
  summed over epochs; start-up and evaluation excluded);
* ``predicted_speedup``: the same ratio of the cost model's cycles for the actions run;
* ``closed_form_speedup``: docs/design.md §4's closed form for an even split with U = 0;
* ``efficiency``: predicted over measured makespan. With emulated device time the prediction
  is cycles × ``cycle_s``; without it, cycles × the baseline's measured seconds per cycle (so
  the baseline's efficiency is 1 by construction and the others say how much of the
  predicted speedup the host delivered);
* utilization per stage, measured (busy seconds over the makespan) and predicted (busy cycles
  over the cycles).

The output directory holds ``sweep.json`` (what the sweep is: written first), one run
directory per run under ``runs/`` (``runs/async-s4/`` ...), ``speedup.json`` (rewritten
after every run, ``"complete": true`` once all ran) and the plots. An interrupted sweep keeps
its finished runs; ``run_sweep(..., resume=True)`` (``--resume``) skips them and starts an
unfinished run over (timings of one run are never stitched together).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import platform
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from aimcpipe.errors import ConfigError
from aimcpipe.launch.train import build_job, load_data
from aimcpipe.launch.train_config import (
    TrainConfig,
    apply_overrides,
    load_config,
    parse_overrides,
)
from aimcpipe.runtime.backends import Backend, make_backend
from aimcpipe.runtime.backends.torch_dist import World
from aimcpipe.runtime.options import BACKENDS
from aimcpipe.runtime.rundir import write_json
from aimcpipe.scheduler import POLICIES, closed_form_speedup
from aimcpipe.stages.blocks import pipeline_blocks
from aimcpipe.stages.zoo import build_model

__all__ = [
    "BASELINE",
    "RESULTS_FILE",
    "SWEEP_FILE",
    "Sweep",
    "default_stages",
    "load_sweep",
    "plan_sweep",
    "run_sweep",
    "summarize",
]

log = logging.getLogger(__name__)

BASELINE = ("wop", 1)
SWEEP_FILE = "sweep.json"
RESULTS_FILE = "speedup.json"
RUNS_DIR = "runs"
METRICS = "metrics.json"


@dataclass(frozen=True)
class Sweep:
    """What a sweep runs: ``config`` (the plain config data, overrides applied) at every
    stage count and policy, on ``backend``, with ``cycle_s`` emulated seconds per cycle (or
    None) for ``epochs`` epochs."""

    config: dict[str, Any]
    stages: tuple[int, ...]
    policies: tuple[str, ...]
    backend: str
    cycle_s: float | None
    epochs: int

    def runs(self) -> list[tuple[str, int]]:
        """(policy, stages) in the order they run: by stage count, the baseline first."""
        out = [BASELINE]
        for stages in sorted(set(self.stages) | {1}):
            for policy in self.policies:
                if stages in self.stages and (policy, stages) not in out:
                    out.append((policy, stages))
        return out

    def run_config(self, policy: str, stages: int) -> TrainConfig:
        data = copy.deepcopy(self.config)
        pipeline = data.get("pipeline") or {}
        overrides: list[tuple[list[str], Any]] = [
            (["pipeline", "policy"], policy),
            (["pipeline", "stages"], stages),
            (["pipeline", "backend"], self.backend),
            (["device_time", "cycle_s"], self.cycle_s),
            (["epochs"], self.epochs),
        ]
        if policy != "async" and isinstance(pipeline, dict) and pipeline.get("weight_stashing"):
            overrides.append((["pipeline", "weight_stashing"], False))  # async only
        apply_overrides(data, overrides)
        return TrainConfig.from_dict(data)

    def run_dir(self, out: Path, policy: str, stages: int) -> Path:
        return out / RUNS_DIR / f"{policy}-s{stages}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["stages"] = list(self.stages)
        data["policies"] = list(self.policies)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sweep:
        return cls(
            config=dict(data["config"]),
            stages=tuple(int(s) for s in data["stages"]),
            policies=tuple(str(p) for p in data["policies"]),
            backend=str(data["backend"]),
            cycle_s=None if data["cycle_s"] is None else float(data["cycle_s"]),
            epochs=int(data["epochs"]),
        )


def default_stages(num_blocks: int) -> list[int]:
    """1, 2, 4, 8, ... up to the model's number of blocks."""
    out = [1]
    while out[-1] * 2 <= num_blocks:
        out.append(out[-1] * 2)
    return out


def plan_sweep(
    config: str | Path | dict[str, Any],
    *,
    stages: Sequence[int] | None = None,
    policies: Sequence[str] = ("wop", "sync-1f1b", "async"),
    backend: str | None = None,
    cycle_s: float | None = None,
    epochs: int | None = None,
    overrides: Sequence[str] = (),
) -> Sweep:
    """Validate a sweep before anything runs: every run's config, the stage counts against
    the model's blocks, the partition. ``backend``, ``cycle_s`` and ``epochs`` default to the
    config's; ``stages`` to 1, 2, 4, ... up to the model's blocks."""
    world = World.from_env()
    if world is not None and world.size > 1:
        raise ConfigError(
            "speedup: it starts the stage processes of each stage count itself; run it "
            "without torchrun (e.g. aimcpipe speedup CONFIG --backend torch)"
        )
    data = copy.deepcopy(config) if isinstance(config, dict) else load_config(config)
    apply_overrides(data, parse_overrides(overrides))
    base = TrainConfig.from_dict(data)  # one line naming the key for anything wrong
    if backend is None:
        backend = base.pipeline.backend
    if backend not in BACKENDS:
        raise ConfigError(
            f"--backend: {backend!r} is not a backend; allowed: {', '.join(BACKENDS)}"
        )
    bad = [p for p in policies if p not in POLICIES]
    if bad or not policies:
        raise ConfigError(
            f"--policies: {bad[0] if bad else 'none'} is not a policy; allowed: "
            f"{', '.join(POLICIES)}"
        )
    if cycle_s is None:
        cycle_s = base.device_time.cycle_s
    if epochs is None:
        epochs = base.epochs
    partition = base.pipeline.partition
    model = build_model(base.model.target, base.model.kwargs, seed=base.seed)
    names = [name for name, _ in pipeline_blocks(model)]
    if stages is None:
        stages = default_stages(len(names))
    stages = list(stages)
    if not stages or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in stages):
        raise ConfigError(f"--stages: {stages!r} is not allowed; use positive integers (1,2,4)")
    if max(stages) > len(names):
        raise ConfigError(
            f"--stages: {max(stages)} stages but the model has only {len(names)} blocks "
            f"({', '.join(names)}); use at most {len(names)}"
        )
    if not isinstance(partition, str):
        raise ConfigError(
            f"pipeline.partition: {partition!r} fixes one split; a sweep over stage counts "
            "needs a method (uniform, params, tiles, time)"
        )
    sweep = Sweep(
        config=data,
        stages=tuple(dict.fromkeys(stages)),
        policies=tuple(dict.fromkeys(policies)),
        backend=backend,
        cycle_s=cycle_s,
        epochs=epochs,
    )
    for policy, count in sweep.runs():
        sweep.run_config(policy, count)  # every run's config is valid
    return sweep


def load_sweep(out: str | Path) -> Sweep:
    """The sweep recorded in ``out`` (for ``--resume``)."""
    out = Path(out)
    path = out / SWEEP_FILE
    if not path.is_file():
        raise ConfigError(f"--resume: {out} has no {SWEEP_FILE}; it is not a speedup sweep")
    try:
        return Sweep.from_dict(json.loads(path.read_text()))
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"--resume: {path} cannot be read ({exc})") from None


@contextlib.contextmanager
def _quiet_epochs() -> Iterator[None]:
    """Per-epoch lines of each run are noise in a sweep (one line per run says it all);
    ``-v`` keeps them."""
    logger = logging.getLogger("aimcpipe.runtime.pipeline")
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        yield
        return
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _finished(run_dir: Path, cfg: TrainConfig) -> dict[str, Any] | None:
    """The metrics of a finished run in ``run_dir`` made with ``cfg``, or None if it did not
    finish (then it is removed: a run's timings are never stitched together)."""
    metrics = run_dir / METRICS
    if not metrics.is_file():
        if run_dir.exists():
            log.info("%s did not finish; running it again", run_dir)
            shutil.rmtree(run_dir)
        return None
    try:
        recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"--resume: {run_dir} cannot be read ({exc})") from None
    expected = yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if cfg.pipeline.partition == "time" and isinstance(recorded, dict):
        # a time partition is measured once and saved as its block counts
        recorded.get("pipeline", {}).pop("partition", None)
        expected["pipeline"].pop("partition", None)
    if recorded != expected:
        raise ConfigError(
            f"--resume: {run_dir}/config.yaml differs from what this sweep runs there; "
            "move that directory away or start a new sweep"
        )
    return _result(run_dir)


def _result(run_dir: Path) -> dict[str, Any]:
    """A finished run's ``metrics.json`` data with its ``history`` (from history.jsonl)."""
    try:
        result = json.loads((run_dir / METRICS).read_text())
        lines = (run_dir / "history.jsonl").read_text().splitlines()
        result["history"] = [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume: {run_dir} cannot be read ({exc})") from None
    return result


def run_sweep(
    sweep: Sweep,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every (policy, stages) of ``sweep`` into ``out``; returns the records of
    ``speedup.json``. ``resume``: keep the finished runs already in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_json(out / SWEEP_FILE, sweep.to_dict())
    runs = sweep.runs()
    configs = {run: sweep.run_config(*run) for run in runs}
    results: dict[tuple[str, int], dict[str, Any]] = {}
    for run in runs:
        found = _finished(sweep.run_dir(out, *run), configs[run])
        if found is not None:
            results[run] = found
    if results:
        log.info("%d of %d runs already finished in %s", len(results), len(runs), out)
    data = load_data(configs[BASELINE]) if len(results) < len(runs) else None
    for stages in sorted({s for _, s in runs}):
        todo = [run for run in runs if run[1] == stages and run not in results]
        if not todo:
            continue
        first = configs[todo[0]]
        backend = make_backend(sweep.backend, first.runtime, first.ray)  # shared by policies
        try:
            _warm_up(first, data, backend)
            for run in todo:
                position = runs.index(run) + 1
                log.info(
                    "[%d/%d] %s, %d stage%s: training %d epochs on %s%s",
                    position, len(runs), run[0], stages, "s" if stages > 1 else "",
                    sweep.epochs, sweep.backend,
                    f", {sweep.cycle_s:g} s per cycle" if sweep.cycle_s else "",
                )  # fmt: skip
                results[run] = _train(
                    configs[run], sweep.run_dir(out, *run), data, backend, progress
                )
                records = summarize(sweep, results, out)
                write_results(out, sweep, records, complete=len(results) == len(runs))
                log.info("[%d/%d] %s", position, len(runs), describe(records[-1]))
        finally:
            backend.close()
    records = summarize(sweep, results, out)
    write_results(out, sweep, records, complete=True)
    return records


def _train(
    cfg: TrainConfig,
    run_dir: Path,
    data: tuple[Any, Any] | None,
    backend: Backend,
    progress: bool,
) -> dict[str, Any]:
    with _quiet_epochs():
        pipe, train_data, test_data = build_job(cfg, progress=progress, data=data, backend=backend)
        pipe.out = run_dir
        with pipe:
            pipe.fit(train_data, test_data, cfg.epochs)
    return _result(run_dir)


def _warm_up(cfg: TrainConfig, data: tuple[Any, Any] | None, backend: Backend) -> None:
    """Two untimed mini-batches on fresh workers, so that no run's timing includes the
    first-call costs of its processes (thread pools, allocators, kernel choices)."""
    assert data is not None
    p = cfg.pipeline
    train = data[0]
    n = min(len(train), 2 * p.microbatches * p.microbatch_size)
    small = train.subset(torch.arange(n))
    settings = cfg.to_dict()
    settings["device_time"]["cycle_s"] = None
    warm = TrainConfig.from_dict(settings)
    with _quiet_epochs():
        pipe, _, _ = build_job(warm, progress=False, data=(small, small), backend=backend)
        with pipe:
            pipe.fit(small, epochs=1)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def summarize(
    sweep: Sweep, results: dict[tuple[str, int], dict[str, Any]], out: Path | None = None
) -> list[dict[str, Any]]:
    """One record per finished run (in run order) from its ``metrics.json`` data, compared
    with the baseline's."""
    base = results.get(BASELINE)
    if base is None:
        return []
    base_s = base["measured"]["makespan_s"]
    base_cycles = base["cycles"]["makespan"]
    seconds_per_cycle = sweep.cycle_s or (base_s / base_cycles if base_cycles else 0.0)
    records = []
    for policy, stages in sweep.runs():
        m = results.get((policy, stages))
        if m is None:
            continue
        measured = m["measured"]
        makespan_s = measured["makespan_s"]
        cycles = m["cycles"]["makespan"]
        predicted_s = cycles * seconds_per_cycle
        per_epoch = m["samples"] // max(m["epochs"], 1)
        minibatches = max(per_epoch // (m["microbatches"] * m["microbatch_size"]), 1)
        util = [b / makespan_s if makespan_s else 0.0 for b in measured["busy_s"]]
        final = m["final"]
        cumulative = 0.0
        history = []
        for row in m["history"]:
            cumulative += row["cycles"]
            history.append(
                {
                    "epoch": row["epoch"],
                    "test_accuracy": row.get("test_accuracy"),
                    "train_loss": row["train_loss"],
                    "cycles": cumulative,
                }
            )
        record = {
            "policy": policy,
            "stages": stages,
            "backend": m["backend"],
            "baseline": (policy, stages) == BASELINE,
            "epochs": m["epochs"],
            "microbatches": m["microbatches"],
            "microbatch_size": m["microbatch_size"],
            "minibatches_per_epoch": minibatches,
            "test_accuracy": final.get("test_accuracy"),
            "test_loss": final.get("test_loss"),
            "train_loss": final.get("train_loss"),
            "cycles": cycles,
            "measured_makespan_s": makespan_s,
            "predicted_makespan_s": predicted_s,
            "wall_s": measured["wall_s"],
            "samples_per_s": m["samples"] / makespan_s if makespan_s else None,
            "measured_speedup": base_s / makespan_s if makespan_s else None,
            "predicted_speedup": base_cycles / cycles if cycles else None,
            "closed_form_speedup": closed_form_speedup(
                policy, stages, m["microbatches"], minibatches
            ),
            "efficiency": predicted_s / makespan_s if makespan_s else None,
            "measured_utilization": _mean(util),
            "predicted_utilization": _mean(m["cycles"]["utilization"]),
            "measured_utilization_per_stage": util,
            "predicted_utilization_per_stage": list(m["cycles"]["utilization"]),
            "overruns": sum(measured["overruns"]),
            "staleness": m["staleness"],
            "peak_stash": m["peak_stash"],
            "history": history,
        }
        if out is not None:
            record["run_dir"] = str(Path(RUNS_DIR) / f"{policy}-s{stages}")
        records.append(record)
    return records


def machine() -> dict[str, Any]:
    """The host the sweep measured (timings mean little without it)."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def write_results(
    out: Path, sweep: Sweep, records: list[dict[str, Any]], *, complete: bool
) -> None:
    predicted = (
        f"cycles × device_time.cycle_s ({sweep.cycle_s:g} s, emulated device time)"
        if sweep.cycle_s
        else "cycles × the baseline's measured seconds per cycle (no emulated device time)"
    )
    write_json(
        out / RESULTS_FILE,
        {
            "complete": complete,
            "baseline": {"policy": BASELINE[0], "stages": BASELINE[1]},
            "backend": sweep.backend,
            "cycle_s": sweep.cycle_s,
            "epochs": sweep.epochs,
            "predicted_makespan": predicted,
            "machine": machine(),
            "runs": records,
        },
    )


def describe(r: dict[str, Any]) -> str:
    """One progress line for a finished run."""
    acc = r["test_accuracy"]
    parts = [f"{r['policy']}, {r['stages']} stage{'s' if r['stages'] > 1 else ''}:"]
    if acc is not None:
        parts.append(f"test accuracy {100 * acc:.2f}%,")
    parts.append(
        f"makespan {r['measured_makespan_s']:.2f} s (predicted {r['predicted_makespan_s']:.2f} s,"
        f" efficiency {r['efficiency']:.2f}), speedup {r['measured_speedup']:.2f}x "
        f"(predicted {r['predicted_speedup']:.2f}x)"
    )
    if r["overruns"]:
        parts.append(f"[{r['overruns']} actions overran their emulated time]")
    return " ".join(parts)


def table(records: Sequence[dict[str, Any]]) -> str:
    """The sweep as an aligned text table."""
    header = [
        "policy", "S", "test acc", "cycles", "makespan s", "predicted s", "efficiency",
        "speedup", "predicted", "closed form", "util meas", "util pred",
    ]  # fmt: skip
    rows = []
    for r in records:
        acc = r["test_accuracy"]
        rows.append(
            [
                r["policy"],
                str(r["stages"]),
                "-" if acc is None else f"{100 * acc:.2f}%",
                f"{r['cycles']:g}",
                f"{r['measured_makespan_s']:.2f}",
                f"{r['predicted_makespan_s']:.2f}",
                f"{r['efficiency']:.3f}",
                f"{r['measured_speedup']:.2f}x",
                f"{r['predicted_speedup']:.2f}x",
                f"{r['closed_form_speedup']:.2f}x",
                f"{r['measured_utilization']:.2f}",
                f"{r['predicted_utilization']:.2f}",
            ]
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines)
