"""``aimcpipe simulate``: time pipeline schedules with the cycle cost model.

Prints a table (or, with ``--json``, exactly one JSON object whose ``results`` rows carry
the docs/design.md §6 keys) and optionally writes an output directory with the results, a
Chrome trace, ASCII timelines, the schedules as CSV and a speedup/utilization plot.

Every flag is checked before anything is simulated or written; the output directory is
assembled in a hidden temporary sibling and renamed into place only when complete, so a bad
flag or a failing run never leaves a half-written ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from aimcpipe.errors import ConfigError
from aimcpipe.launch.flags import check_size, int_flag, number, policy_list, stage_list
from aimcpipe.launch.outdir import check_out_dir, staged_dir
from aimcpipe.scheduler import POLICIES, HardwareModel, SimResult, simulate, sweep
from aimcpipe.scheduler.costs import parse_cost_spec, parse_energy_spec
from aimcpipe.scheduler.files import load_schedule, save_schedule
from aimcpipe.scheduler.simulate import wop_baseline
from aimcpipe.scheduler.timeline import render_timeline
from aimcpipe.scheduler.trace import write_chrome_trace

__all__ = ["add_arguments", "run"]

log = logging.getLogger(__name__)

DEFAULT_POLICIES = "wop,sync-1f1b,async"
DEFAULT_COST = "F=1,B=1,U=1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stages", metavar="LIST", help="stage counts to simulate, e.g. 1,2,4,8 (required)"
    )
    parser.add_argument(
        "--microbatches", metavar="Bm", help="micro-batches per mini-batch (required)"
    )
    parser.add_argument("--minibatches", metavar="K", help="mini-batches in the run (default 1)")
    parser.add_argument(
        "--policies",
        metavar="LIST",
        help=f"comma-separated, from {', '.join(POLICIES)} (default {DEFAULT_POLICIES})",
    )
    parser.add_argument(
        "--cost",
        metavar="SPEC",
        default=DEFAULT_COST,
        help="cycles per micro-batch: F=..,B=..,U=.. (U per micro-batch applied); a value may "
        f"be a per-stage list joined by ':' (default {DEFAULT_COST})",
    )
    parser.add_argument(
        "--latency", metavar="L", default="0", help="cycles per message between stages (0)"
    )
    parser.add_argument(
        "--fixed-model",
        action="store_true",
        help="--cost is the whole model's; each of S stages costs 1/S of it (arXiv 2410.15155)",
    )
    parser.add_argument(
        "--weight-stashing", action="store_true", help="async: backward uses its forward's weights"
    )
    parser.add_argument(
        "--drain-every", metavar="M", help="async: drain the pipeline every M mini-batches"
    )
    parser.add_argument(
        "--schedule",
        metavar="FILE",
        help="simulate a custom schedule from a .json or .csv file (sets the stage count)",
    )
    parser.add_argument(
        "--cycle-ns", metavar="NS", help="hardware model: cycle time in ns (reports time_ns)"
    )
    parser.add_argument(
        "--energy",
        metavar="SPEC",
        help="hardware model: pJ per micro-batch F=..,B=..,U=.., per message M=.., per idle "
        "stage-cycle idle=.. (reports energy_pj)",
    )
    parser.add_argument(
        "--timeline", action="store_true", help="print ASCII timelines after the table"
    )
    parser.add_argument(
        "--timeline-width", metavar="N", default="120", help="timeline width in characters (120)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object, no table")
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="write results.json, trace.json, timeline.txt, schedules/ and speedup.png",
    )
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out DIR")


# measured for `simulate --policies async` (8 stages, 10^4 and 10^5 micro-batches): ~360 B of
# memory per action of the schedule being simulated, and 3.5 µs per action on a fast core
_BYTES_PER_ACTION = 360
_SECONDS_PER_ACTION = 1e-6  # a lower bound


def _check_sweep_size(stages: list[int], bm: int, k: int, policies: int) -> None:
    """Refuse a sweep whose schedules would not fit in memory or would not finish: each
    schedule has up to 3 actions (F, B, U) per stage and micro-batch, and every stage count
    also simulates wop as the baseline."""
    largest = 3 * max(stages) * bm * k
    total = 3 * sum(stages) * bm * k * (policies + 1)
    check_size(
        "--stages/--microbatches/--minibatches",
        f"simulating {total:,} actions (the largest schedule {largest:,})",
        largest * _BYTES_PER_ACTION,
        total * _SECONDS_PER_ACTION,
    )


def run(args: argparse.Namespace) -> int:
    # ---- check every flag before simulating or writing anything
    stages = stage_list(args.stages)
    policies = policy_list(args.policies)
    latency = number("--latency", args.latency)
    costs = parse_cost_spec(args.cost, latency=latency)
    hardware: HardwareModel | None = None
    if args.cycle_ns is not None or args.energy is not None:
        cycle_ns = number("--cycle-ns", args.cycle_ns, positive=True) if args.cycle_ns else 1.0
        hardware = parse_energy_spec(args.energy or "", cycle_ns=cycle_ns)
    width = int_flag("--timeline-width", args.timeline_width, 40)
    if args.timeline and args.json:
        raise ConfigError("--timeline prints text and cannot be combined with --json")
    drain_every = (
        None if args.drain_every is None else int_flag("--drain-every", args.drain_every, 1)
    )
    out_dir = check_out_dir(args.out, force=args.force)
    async_opts: dict[str, Any] = {}
    if args.weight_stashing:
        async_opts["weight_stashing"] = True
    if drain_every is not None:
        async_opts["drain_every"] = drain_every
    if args.fixed_model and costs.is_per_stage:
        raise ConfigError("--fixed-model: --cost must give whole-model values, not ':' lists")

    pairs: list[tuple[SimResult, dict[str, Any]]] = []
    if args.schedule is not None:
        custom = load_schedule(args.schedule)
        num = custom.num_stages
        if stages is not None and stages != [num]:
            raise ConfigError(f"--stages: the schedule file has {num} stages, not {args.stages}")
        stages = [num]
        bm = int_flag("--microbatches", args.microbatches, 1, custom.microbatches_per_minibatch)
        k = int_flag("--minibatches", args.minibatches, 1, custom.minibatches)
        if bm * k != custom.num_microbatches:
            raise ConfigError(
                f"--microbatches/--minibatches: {bm} x {k} does not match the "
                f"{custom.num_microbatches} micro-batches of {args.schedule}"
            )
        if (bm, k) != (custom.microbatches_per_minibatch, custom.minibatches):
            custom = type(custom)(
                custom.policy, custom.stages, bm, k, weight_stashing=custom.weight_stashing
            )
        stage_costs = costs.split(num) if args.fixed_model else costs
        stage_hw = hardware.split(num) if (args.fixed_model and hardware) else hardware
        stage_costs.per_stage(num)
        result = simulate(custom, stage_costs, stage_hw)
        pairs.append((result, result.to_row(wop_baseline(custom, stage_costs).makespan)))
        policies = policies or []
    else:
        if stages is None:
            raise ConfigError("--stages is required (e.g. --stages 1,2,4,8) unless --schedule")
        bm = int_flag("--microbatches", args.microbatches, 1)
        k = int_flag("--minibatches", args.minibatches, 1, 1)
        policies = policies if policies is not None else DEFAULT_POLICIES.split(",")
    if policies:
        _check_sweep_size(stages, bm, k, len(policies))
    for num in stages:
        if costs.is_per_stage:
            try:
                costs.per_stage(num)
            except ConfigError as exc:
                raise ConfigError(f"--cost: {exc}") from None
    if policies:
        pairs += sweep(
            policies,
            stages,
            bm,
            k,
            costs,
            fixed_model=args.fixed_model,
            hardware=hardware,
            options={"async": async_opts},
        )

    rows = [row for _, row in pairs]
    document = {
        "command": "simulate",
        "config": {
            "stages": stages,
            "microbatches": bm,
            "minibatches": k,
            "policies": policies,
            "schedule": args.schedule,
            "costs": costs.to_dict(),
            "fixed_model": args.fixed_model,
            "hardware": hardware.to_dict() if hardware else None,
            "async_options": async_opts,
            "time_unit": "cycles",
        },
        "results": rows,
    }
    if out_dir is not None:
        _write_out(out_dir, document, pairs, width)
    if args.json:
        json.dump(document, sys.stdout)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_table(rows) + "\n")
        if args.timeline:
            for result, _ in pairs:
                sys.stdout.write("\n" + render_timeline(result, width) + "\n")
        if out_dir is not None:
            sys.stdout.write(f"wrote {out_dir}\n")
    return 0


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width table: one line per (policy, S); per-stage lists shown by their max."""
    hw = any("time_ns" in r for r in rows)
    header = ["policy", "S", "Bm", "K", "makespan", "speedup", "util", "bubble"]
    header += ["stale_max", "stash_max"] + (["time_ns", "energy_pj"] if hw else [])
    lines = [header]
    for r in rows:
        line = [
            r["policy"] + ("+ws" if r.get("weight_stashing") else ""),
            r["stages"],
            r["microbatches"],
            r["minibatches"],
            r["makespan"],
            r["speedup_vs_wop"],
            r["utilization"],
            r["bubble_fraction"],
            max(r["staleness"]),
            max(r["peak_stash"]),
        ]
        if hw:
            line += [r.get("time_ns"), r.get("energy_pj")]
        lines.append([_fmt(v) for v in line])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = []
    for j, line in enumerate(lines):
        cells = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        out.append("  ".join(cells).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _write_out(
    out_dir: Path,
    document: dict[str, Any],
    pairs: list[tuple[SimResult, dict[str, Any]]],
    width: int,
) -> None:
    """Assemble everything in a temporary sibling, then rename it to ``out_dir``."""
    from aimcpipe.scheduler.plot import plot_speedup

    with staged_dir(out_dir) as tmp:
        (tmp / "results.json").write_text(json.dumps(document, indent=1) + "\n")
        write_chrome_trace(tmp / "trace.json", [r for r, _ in pairs])
        (tmp / "timeline.txt").write_text(
            "\n\n".join(render_timeline(r, width) for r, _ in pairs) + "\n"
        )
        sched_dir = tmp / "schedules"
        sched_dir.mkdir()
        used: set[str] = set()
        for result, _ in pairs:
            s = result.schedule
            stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in s.policy)
            name = f"{stem}-S{s.num_stages}"
            while name in used:
                name += "_"
            used.add(name)
            save_schedule(s, sched_dir / f"{name}.csv")
        cfg = document["config"]
        plot_speedup(
            [row for _, row in pairs],
            tmp / "speedup.png",
            title=f"Bm={cfg['microbatches']} K={cfg['minibatches']}"
            + (" fixed model" if cfg["fixed_model"] else ""),
        )
