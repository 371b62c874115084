"""Runtime efficiency and measured speedup with emulated device time, torch and Ray.

An ``aimcpipe speedup`` sweep per backend: a digits analog FCN of 8 layers (so it splits
into 1, 2, 4 and 8 stages of equal cost under ``cost.per: layer``), one epoch of 1280
samples (Bm = 4 micro-batches of 8), F = B = U = 1 cycle per layer, every policy. With
``device_time.cycle_s`` every action lasts its cost in cycles × cycle_s, so the measured
makespan is what accelerators would take plus what the runtime adds. Reports, per backend,
stage count and policy:

* efficiency = predicted makespan (cycles × cycle_s) / measured makespan
  (targets: >= 0.95 torch, >= 0.90 Ray);
* measured speedup of async over wop at S = 1 (targets: >= 3.7× at S = 4, >= 7× at S = 8);
* where the lost time goes, from each run's trace, along its critical path (see
  :func:`where_time_goes`): hand-overs between stages, each stage's own dispatch between
  actions, and actions overshooting their emulated time. (The central scheduler is not on
  this path: it builds the action lists before the epoch and is not called during it.)

Run::

    PYTHONPATH=. .venv/bin/python benchmarks/runtime_efficiency.py --cycle-s 0.005

Results: ``benchmarks/results/runtime_efficiency.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info

from aimcpipe.launch.speedup import plan_sweep, run_sweep

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ("wop", "sync-1f1b", "async")
EFFICIENCY = {"torch": 0.95, "ray": 0.90}
ASYNC_SPEEDUP = {4: 3.7, 8: 7.0}
HIDDEN = [64, 64, 64, 64, 48, 48, 32]  # 8 Linear layers: 64 -> ... -> 10


def config(samples: int) -> dict:
    return {
        "seed": 0,
        "epochs": 1,
        "model": {"name": "digits-fcn", "kwargs": {"hidden": HIDDEN, "activation": "tanh"}},
        "analog": {"rule": "analog-sgd", "device": {"kind": "soft-bounds", "tau": 1.0}},
        "data": {"name": "digits", "limit_train": samples, "limit_test": 100},
        "pipeline": {"microbatches": 4, "microbatch_size": 8},
        "optim": {"lr": 0.1},
        "runtime": {"timeout_s": 120},
        "checkpoint_every": 0,
    }


def _count(microbatches: str) -> int:
    """Micro-batches in a trace label: ``"4"``, ``"0-3"`` or ``"1,5"``."""
    total = 0
    for part in microbatches.split(","):
        lo, _, hi = part.partition("-")
        total += int(hi) - int(lo) + 1 if hi else 1
    return total


CLOCK_SLACK_US = 50  # a consumer may start this much before its producer's end (clock reads)


class Action(NamedTuple):
    kind: str  # the trace's category: forward, backward, update
    stage: int
    microbatches: str
    start: float  # µs, clocks aligned
    end: float
    due: float  # its emulated duration, µs

    @property
    def emulated_end(self) -> float:
        """When its output is usable by a neighbour (held until then)."""
        return self.start + self.due


def _actions(run_dir: Path, cycle_s: float) -> list[Action]:
    trace = json.loads((run_dir / "trace.json").read_text())
    layers = json.loads((run_dir / "partition.json").read_text())["layers"]
    out = []
    for e in trace["traceEvents"]:
        if e.get("ph") != "X":
            continue
        s, mbs = e["args"]["stage"], str(e["args"]["microbatches"])
        units = _count(mbs) if e["cat"] == "update" else 1
        due = layers[s] * units * cycle_s * 1e6
        out.append(Action(e["cat"], s, mbs, e["ts"], e["ts"] + e["dur"], due))
    return out


def where_time_goes(run_dir: Path, cycle_s: float) -> dict:
    """Split the time a run lost against its emulated schedule along its critical path.

    Walks back from the action that ended last. Each action waited either for its own
    stage's previous action to end (then the gap between is the stage's *dispatch*: reading
    the next micro-batch, recording the action) or for a neighbour's output, usable at the
    producer's emulated end (then the gap is the *hand-over*: waking up on the message and
    unpacking it). An action whose own end bounds the next one adds its *overshoot* beyond
    its emulated time. On a path whose emulated lengths add up to the predicted makespan the
    three sum to the time lost (``path_emulated_s`` says whether they do)."""
    acts = _actions(run_dir, cycle_s)
    stages = max(a.stage for a in acts) + 1
    previous: dict[Action, Action | None] = {}
    by_stage: dict[int, list[Action]] = {}
    for a in sorted(acts, key=lambda a: a.start):
        by_stage.setdefault(a.stage, []).append(a)
    for xs in by_stage.values():
        previous.update(zip(xs, [None, *xs[:-1]], strict=True))
    outputs: dict[tuple[str, int, str], list[Action]] = {}
    for a in acts:
        outputs.setdefault((a.kind, a.stage, a.microbatches), []).append(a)

    def producer(a: Action) -> Action | None:
        src = a.stage - 1 if a.kind == "forward" else a.stage + 1
        if a.kind == "update" or not 0 <= src < stages:
            return None
        usable = [p for p in outputs.get((a.kind, src, a.microbatches), ())
                  if p.emulated_end <= a.start + CLOCK_SLACK_US]  # fmt: skip
        return max(usable, key=lambda p: p.start, default=None)

    a = max(acts, key=lambda a: a.end)
    overshoot = a.end - a.start - a.due
    emulated = 0.0
    handovers: list[float] = []
    dispatches: list[float] = []
    while True:
        emulated += a.due
        own, prod = previous[a], producer(a)
        if own is None and prod is None:
            break
        if prod is not None and (own is None or prod.emulated_end > own.end):
            handovers.append(a.start - prod.emulated_end)
            a = prod
        else:
            dispatches.append(a.start - own.end)
            overshoot += own.end - own.start - own.due
            a = own
    return {
        "actions": len(handovers) + len(dispatches) + 1,
        "path_emulated_s": emulated * 1e-6,
        "overshoot_s": overshoot * 1e-6,
        "handover_s": sum(handovers) * 1e-6,
        "handovers": len(handovers),
        "median_handover_us": statistics.median(handovers) if handovers else 0.0,
        "dispatch_s": sum(dispatches) * 1e-6,
        "dispatches": len(dispatches),
        "median_dispatch_us": statistics.median(dispatches) if dispatches else 0.0,
        "median_action_overshoot_us": statistics.median(a.end - a.start - a.due for a in acts),
    }


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, axes = plt.subplots(2, len(backends), figsize=(5.5 * len(backends), 7.5), squeeze=False)
    for col, backend in enumerate(backends):
        ax_s, ax_e = axes[0][col], axes[1][col]
        mine = [r for r in rows if r["backend"] == backend]
        top = max(r["stages"] for r in mine)
        ax_s.plot([1, top], [1, top], ":", color="grey", label="ideal (= S)")
        for i, policy in enumerate(POLICIES):
            pts = sorted((r["stages"], r["measured_speedup"], r["predicted_speedup"],
                          r["efficiency"]) for r in mine if r["policy"] == policy)  # fmt: skip
            xs = [p[0] for p in pts]
            ax_s.plot(xs, [p[1] for p in pts], "-o", color=f"C{i}", label=f"{policy} measured")
            ax_s.plot(xs, [p[2] for p in pts], "s", mfc="none", ms=9, color=f"C{i}",
                      label=f"{policy} predicted")  # fmt: skip
            ax_e.plot(xs, [p[3] for p in pts], "-o", color=f"C{i}", label=policy)
        ax_e.axhline(EFFICIENCY[backend], color="grey", ls="--", lw=1,
                     label=f"target {EFFICIENCY[backend]}")  # fmt: skip
        for ax in (ax_s, ax_e):
            ax.set_xticks(sorted({r["stages"] for r in mine}))
            ax.grid(alpha=0.3)
            ax.set_xlabel("stages S")
        ax_s.set(title=f"{backend}: speedup vs wop at S = 1", ylabel="speedup")
        ax_e.set(title=f"{backend}: runtime efficiency", ylabel="predicted / measured makespan",
                 ylim=(0.8, 1.01))  # fmt: skip
        ax_s.legend(fontsize=7, ncol=2)
        ax_e.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycle-s", type=float, default=0.005, help="seconds per cycle")
    parser.add_argument("--samples", type=int, default=1280, help="training samples (an epoch)")
    parser.add_argument("--backends", default="torch,ray")
    parser.add_argument("--stages", default="1,2,4,8")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    stages = [int(s) for s in args.stages.split(",")]
    for backend in args.backends.split(","):
        started = time.perf_counter()
        sweep = plan_sweep(config(args.samples), stages=stages, policies=POLICIES,
                           backend=backend, cycle_s=args.cycle_s)  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            records = run_sweep(sweep, Path(tmp) / "sweep", progress=False)
            for r in records:
                path = where_time_goes(Path(tmp) / "sweep" / r["run_dir"], args.cycle_s)
                row = {k: r[k] for k in (
                    "policy", "stages", "cycles", "predicted_makespan_s", "measured_makespan_s",
                    "efficiency", "measured_speedup", "predicted_speedup", "overruns",
                )}  # fmt: skip
                row.update(
                    backend=backend,
                    lost_s=r["measured_makespan_s"] - r["predicted_makespan_s"],
                    critical_path=path,
                    meets_efficiency_target=r["efficiency"] >= EFFICIENCY[backend],
                )
                if r["policy"] == "async" and r["stages"] in ASYNC_SPEEDUP:
                    row["meets_speedup_target"] = (
                        r["measured_speedup"] >= ASYNC_SPEEDUP[r["stages"]]
                    )
                rows.append(row)
                print(
                    f"{backend:5s} S={r['stages']} {r['policy']:9s} efficiency "
                    f"{r['efficiency']:.3f}, speedup {r['measured_speedup']:.2f}x (predicted "
                    f"{r['predicted_speedup']:.2f}x), lost {row['lost_s']:.3f} s; on the "
                    f"critical path: hand-overs {path['handover_s']:.3f} s "
                    f"({path['handovers']}, median {path['median_handover_us']:.0f} µs), "
                    f"dispatch {path['dispatch_s']:.3f} s ({path['dispatches']}, median "
                    f"{path['median_dispatch_us']:.0f} µs), overshoot {path['overshoot_s']:.3f} s;"
                    f" overruns {r['overruns']}"
                )
        print(f"  ({time.perf_counter() - started:.0f} s with start-up)")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "runtime_efficiency",
        "command": "PYTHONPATH=. .venv/bin/python benchmarks/runtime_efficiency.py "
        f"--cycle-s {args.cycle_s} --samples {args.samples} --backends {args.backends} "
        f"--stages {args.stages}",
        "machine": machine_info(),
        "settings": {
            "model_hidden": HIDDEN,
            "microbatches": 4,
            "microbatch_size": 8,
            "cost": "F = B = U = 1 per layer",
            "epochs": 1,
        },
        "targets": {"efficiency": EFFICIENCY, "async_measured_speedup": ASYNC_SPEEDUP},
        "results": rows,
    }
    (args.out / "runtime_efficiency.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(rows, args.out / "runtime_efficiency.png")


if __name__ == "__main__":
    main()
