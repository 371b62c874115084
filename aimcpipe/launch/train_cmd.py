"""``aimcpipe train CONFIG.yaml``: train a model with a pipeline policy (docs/design.md §6).

Writes the run directory (``--out``): config.yaml (resolved), history.jsonl, checkpoint.pt,
partition.json, trace.json, model.pt, curves.png and metrics.json (written last). A run that
stops early keeps its checkpoint: ``aimcpipe train --resume DIR`` continues it exactly.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from aimcpipe.errors import ConfigError
from aimcpipe.launch.flags import int_flag, number, path_arg
from aimcpipe.launch.outdir import check_out_dir, check_writable
from aimcpipe.launch.train import load_data, plan, resolve_config, train
from aimcpipe.launch.train_config import check_run_size
from aimcpipe.runtime.backends.torch_dist import World, release_world, serve
from aimcpipe.runtime.checkpoint import CHECKPOINT_NAME
from aimcpipe.runtime.options import BACKENDS
from aimcpipe.runtime.ray_address import parse_ray_address
from aimcpipe.scheduler import POLICIES

__all__ = ["add_arguments", "run"]


EXAMPLES = """examples:
  aimcpipe train configs/digits-analog.yaml --out runs/digits
  aimcpipe train configs/digits-analog.yaml --policy sync-1f1b --stages 2 --dry-run
  aimcpipe train configs/lsq.yaml --set analog.rule=tiki-taka --set optim.lr=1e-2
  aimcpipe train --resume runs/digits --set epochs=30
  aimcpipe train configs/digits-analog.yaml --backend torch --cycle-s 0.01
  torchrun --nproc-per-node 4 -m aimcpipe train configs/digits-analog.yaml --backend torch
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EXAMPLES
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("config", nargs="?", type=path_arg, help="YAML config (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value by key path, e.g. --set pipeline.microbatches=8 "
        "(repeatable; values are YAML)",
    )
    p.add_argument(
        "--backend",
        choices=list(BACKENDS),
        help="where stages run: local (one process), torch (one process per stage, or "
        "torchrun's), ray (one actor per stage) (pipeline.backend)",
    )
    p.add_argument("--stages", metavar="N", help="number of pipeline stages (pipeline.stages)")
    p.add_argument(
        "--policy",
        choices=list(POLICIES),
        help="schedule policy (pipeline.policy)",
    )
    p.add_argument("--epochs", metavar="E", help="number of epochs (epochs)")
    p.add_argument(
        "--cycle-s",
        metavar="S",
        help="emulated device time: seconds per cost-model cycle (device_time.cycle_s)",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="join this Ray cluster instead of starting a local Ray (ray.address)",
    )
    p.add_argument(
        "--out", type=path_arg, metavar="DIR", help="run directory (default: no files written)"
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument(
        "--resume", type=path_arg, metavar="DIR", help="continue the run in DIR from its checkpoint"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate, build the model and print the partition and one epoch's simulated "
        "schedule; train nothing, write nothing",
    )
    p.add_argument("--json", action="store_true", help="print metrics.json to stdout at the end")


def run(args: argparse.Namespace) -> int:
    world = World.from_env()
    if world is not None and world.rank != 0:
        return serve(world)  # torchrun's other ranks do what rank 0 says
    try:
        return _run(args)
    finally:
        if world is not None:
            release_world(world)


# the shortcut flags and the config keys they set
SHORTCUTS = (
    ("--backend", "backend", "pipeline.backend"),
    ("--stages", "stages", "pipeline.stages"),
    ("--policy", "policy", "pipeline.policy"),
    ("--epochs", "epochs", "epochs"),
    ("--cycle-s", "cycle_s", "device_time.cycle_s"),
    ("--ray-address", "ray_address", "ray.address"),
)


def _shortcut_values(args: argparse.Namespace) -> dict[str, tuple[str, object]]:
    """Config key -> (flag, value) of every shortcut flag given, each checked here so that its
    errors name the flag."""
    out: dict[str, tuple[str, object]] = {}
    for flag, attr, key in SHORTCUTS:
        text = getattr(args, attr)
        if text is None:
            continue
        value: object = text
        if flag in ("--stages", "--epochs"):
            value = int_flag(flag, text, 1)
        elif flag == "--cycle-s":
            value = number(flag, text, positive=True)
        elif flag == "--ray-address":
            parse_ray_address(text, flag)
        out[key] = (flag, value)
    return out


def _in_user_terms(message: str, typed: dict[str, str]) -> str:
    """Name what the user typed: a config key set by a shortcut flag becomes the flag
    (``pipeline.stages: ...`` -> ``--stages: ...``), anywhere in the message for dotted keys
    and at its start for ``epochs``."""
    for key, flag in typed.items():
        for prefix in (f"{key}:", f"--set {key}:"):
            if message.startswith(prefix):
                message = f"{flag}:{message[len(prefix) :]}"
        message = message.replace(f"set {key}: ", f"{flag} ")  # a suggested value
        if "." in key:
            message = re.sub(rf"(?<![\w.-]){re.escape(key)}(?![\w.])", flag, message)
    return message


def _run(args: argparse.Namespace) -> int:
    shortcuts = _shortcut_values(args)
    typed = {key: flag for key, (flag, _) in shortcuts.items()}
    if args.resume is not None:
        typed["CONFIG"] = "--resume"
    try:
        return _train(args, shortcuts, typed)
    except ConfigError as exc:
        raise ConfigError(_in_user_terms(str(exc), typed)) from None


def _check_resume(run_dir: Path) -> None:
    if not run_dir.exists():
        raise ConfigError(f"--resume: {run_dir} does not exist (give a run directory)")
    if not run_dir.is_dir():
        raise ConfigError(f"--resume: {run_dir} is a file, not a run directory")


def _train(
    args: argparse.Namespace, shortcuts: dict[str, tuple[str, object]], typed: dict[str, str]
) -> int:
    # JSON is YAML: each value reaches the config as what it is (an address stays a string)
    overrides = list(args.overrides)
    overrides += [f"{key}={json.dumps(value)}" for key, (_, value) in shortcuts.items()]
    if args.resume is not None:
        _check_resume(args.resume)
    if args.dry_run and (args.resume is not None or args.out is not None):
        raise ConfigError("--dry-run writes nothing; drop --out/--resume")
    cfg = resolve_config(args.config, overrides, args.resume)
    if args.resume is not None:
        check_writable(args.resume, "--resume")
    elif not args.dry_run:
        check_out_dir(args.out, force=args.force, resumable_by=CHECKPOINT_NAME)
    # work and memory, estimated before anything is built (one more read of the data set)
    check_run_size(cfg, train_samples=len(load_data(cfg)[0]), names=typed)
    if args.dry_run:
        print(plan(args.config, overrides))
        return 0
    try:
        metrics = train(
            args.config,
            out=args.out,
            overrides=overrides,
            resume=args.resume,
            force=args.force,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    except KeyboardInterrupt:
        run_dir = args.resume or args.out
        hint = ""
        if run_dir is not None and (run_dir / CHECKPOINT_NAME).is_file():
            hint = f"; continue with: aimcpipe train --resume {run_dir}"
        print(f"aimcpipe train: interrupted{hint}", file=sys.stderr)
        return 130
    result = metrics.to_dict()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    final = result["final"]
    line = [f"{result['policy']} on {result['stages']} stage(s), {result['epochs']} epoch(s)"]
    line.append(f"train loss {final['train_loss']:.4f}")
    if final.get("test_loss") is not None:
        line.append(f"test loss {final['test_loss']:.4f}")
    if final.get("test_accuracy") is not None:
        line.append(f"test accuracy {100 * final['test_accuracy']:.2f}%")
    print(", ".join(line))
    util = ", ".join(f"{u:.2f}" for u in result["cycles"]["utilization"])
    print(
        f"cycles {result['cycles']['makespan']:g} (utilization per stage {util}), "
        f"staleness {result['staleness']}, peak stash {result['peak_stash']}, "
        f"wall {result['measured']['wall_s']:.1f}s, {result['samples_per_s']:.0f} samples/s"
    )
    out = args.resume or args.out
    if out is not None:
        print(f"run directory: {out}")
    return 0
