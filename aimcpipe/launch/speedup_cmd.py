"""``aimcpipe speedup CONFIG.yaml``: measured speedup vs stage count for each policy.

Trains the config's model, data and seed once per (policy, stage count) on one backend and
compares each run with wop on one stage: measured and predicted speedup, runtime efficiency,
utilization, accuracy (see :mod:`aimcpipe.launch.speedup`). Writes ``--out``: ``sweep.json``,
``runs/POLICY-sS/`` (each a full run directory), ``speedup.json`` and the plots
(``speedup.png``, ``utilization.png``, ``accuracy.png``); prints a line per run and a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from aimcpipe.errors import ConfigError
from aimcpipe.launch.flags import int_flag, number, path_arg, policy_list, stage_list
from aimcpipe.launch.outdir import check_out_dir, check_writable
from aimcpipe.launch.speedup import (
    BASELINE,
    RESULTS_FILE,
    SWEEP_FILE,
    load_sweep,
    plan_sweep,
    run_sweep,
    table,
)
from aimcpipe.launch.speedup_plots import plot_sweep
from aimcpipe.launch.train import load_data
from aimcpipe.launch.train_config import (
    TrainConfig,
    apply_overrides,
    check_run_size,
    load_config,
    parse_overrides,
)
from aimcpipe.runtime.options import BACKENDS
from aimcpipe.runtime.ray_address import parse_ray_address

__all__ = ["add_arguments", "run"]

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("runs/speedup")

EXAMPLES = """examples:
  aimcpipe speedup configs/digits-analog.yaml --stages 1,2,4 --backend torch --cycle-s 0.002
  aimcpipe speedup configs/digits-analog.yaml --policies sync-1f1b,async --epochs 3 --out runs/s
  aimcpipe speedup configs/mnist-fcn.yaml --backend ray --set data.root=data/mnist
  aimcpipe speedup --resume runs/speedup      # an interrupted sweep: skip the finished runs
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("config", nargs="?", type=path_arg, help="YAML config (see configs/)")
    p.add_argument(
        "--stages",
        metavar="LIST",
        help="stage counts, e.g. 1,2,4,8 (default: 1, 2, 4, ... up to the model's blocks)",
    )
    p.add_argument(
        "--policies",
        metavar="LIST",
        default="wop,sync-1f1b,async",
        help="policies to run (default %(default)s); wop on 1 stage always runs: it is the "
        "baseline",
    )
    p.add_argument(
        "--backend",
        choices=list(BACKENDS),
        help="where stages run (default: the config's pipeline.backend)",
    )
    p.add_argument(
        "--cycle-s",
        metavar="S",
        help="emulated device time: seconds per cost-model cycle (default: the config's "
        "device_time.cycle_s; none: as fast as this machine runs)",
    )
    p.add_argument("--epochs", metavar="E", help="epochs per run (default: the config's)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by key path (repeatable), as for aimcpipe train",
    )
    p.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (ray.address)")
    p.add_argument(
        "--out", type=path_arg, metavar="DIR", help=f"output directory (default {DEFAULT_OUT})"
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument(
        "--resume",
        type=path_arg,
        metavar="DIR",
        help="continue the sweep in DIR: finished runs are kept, the rest run",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print speedup.json to stdout at the end")


def _base_config(
    config: Path, overrides: list[str], cycle_s: float | None, epochs: int | None
) -> TrainConfig:
    """The config as the sweep's baseline will run it (for the size estimate)."""
    data = load_config(config)
    apply_overrides(data, parse_overrides(overrides))
    if cycle_s is not None:
        apply_overrides(data, [(["device_time", "cycle_s"], cycle_s)])
    if epochs is not None:
        apply_overrides(data, [(["epochs"], epochs)])
    return TrainConfig.from_dict(data)


def run(args: argparse.Namespace) -> int:
    progress = not args.no_progress and sys.stderr.isatty()
    if args.resume is not None:
        given = [
            flag
            for flag, value in (
                ("CONFIG", args.config),
                ("--stages", args.stages),
                ("--backend", args.backend),
                ("--cycle-s", args.cycle_s),
                ("--epochs", args.epochs),
                ("--set", args.overrides),
                ("--ray-address", args.ray_address),
                ("--force", args.force),
            )
            if value
        ]
        if args.policies != "wop,sync-1f1b,async":
            given.append("--policies")
        if given:
            raise ConfigError(
                f"--resume: a resumed sweep keeps its settings (sweep.json); drop {given[0]}"
            )
        if args.out is not None and args.out.resolve() != args.resume.resolve():
            raise ConfigError("--out: a resumed sweep continues in its own directory")
        out = args.resume
        if not out.exists():
            raise ConfigError(f"--resume: {out} does not exist (give a sweep's --out directory)")
        if not out.is_dir():
            raise ConfigError(f"--resume: {out} is a file, not a sweep's --out directory")
        check_writable(out, "--resume")
        sweep = load_sweep(out)
    else:
        if args.config is None:
            raise ConfigError("CONFIG: give a config file (see configs/) or --resume DIR")
        overrides = list(args.overrides)
        names: dict[str, str] = {}
        if args.ray_address is not None:
            parse_ray_address(args.ray_address, "--ray-address")
            overrides.append(f"ray.address={json.dumps(args.ray_address)}")  # JSON is YAML
        cycle_s = None
        if args.cycle_s is not None:
            cycle_s = number("--cycle-s", args.cycle_s, positive=True)
            names["device_time.cycle_s"] = "--cycle-s"
        epochs = None
        if args.epochs is not None:
            epochs = int_flag("--epochs", args.epochs, 1)
            names["epochs"] = "--epochs"
        stages = stage_list(args.stages)
        policies = policy_list(args.policies) or []
        out = args.out if args.out is not None else DEFAULT_OUT
        flag = "--out" if args.out is not None else f"--out (default {DEFAULT_OUT})"
        try:
            check_out_dir(out, force=args.force, resumable_by=SWEEP_FILE)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("--out", flag, 1)) from None
        # the first run's work and memory, estimated before the model is built
        base = _base_config(args.config, overrides, cycle_s, epochs)
        samples = len(load_data(base)[0])
        check_run_size(base, train_samples=samples, runs=[BASELINE], names=names)
        sweep = plan_sweep(
            args.config,
            stages=stages,
            policies=policies,
            backend=args.backend,
            cycle_s=cycle_s,
            epochs=epochs,
            overrides=overrides,
        )
        # and the whole sweep's
        first = sweep.run_config(*BASELINE)
        check_run_size(first, train_samples=samples, runs=sweep.runs(), names=names)
        if out.exists():
            shutil.rmtree(out)  # --force (checked above): a new sweep starts empty
    try:
        records = run_sweep(sweep, out, resume=args.resume is not None, progress=progress)
    except KeyboardInterrupt:
        print(
            f"aimcpipe speedup: interrupted; the finished runs are kept; continue with: "
            f"aimcpipe speedup --resume {out}",
            file=sys.stderr,
        )
        return 130
    model = sweep.config.get("model") or {}
    plots = plot_sweep(records, out, title=str(model.get("name") or model.get("factory") or ""))
    if args.json:
        print((out / RESULTS_FILE).read_text(), end="")
        return 0
    print(table(records))
    print(f"results: {out / RESULTS_FILE}")
    for path in plots:
        print(f"plot: {path}")
    over = [f"{r['policy']} S={r['stages']}: {r['overruns']}" for r in records if r["overruns"]]
    if over:
        print(
            f"note: actions that took longer on this host than their emulated time "
            f"({', '.join(over)}); if many, raise --cycle-s for timings true to the cost model"
        )
    if sweep.backend == "local":
        print(
            "note: on the local backend every stage runs in this one process, so measured "
            "speedup shows overhead only; use --backend torch or ray"
        )
    return 0
