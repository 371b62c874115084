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
* where the lost time goes, from each run's trace: the actions' overshoot beyond their
  emulated time (the wake-up after each wait), summed on the busiest stage, and the rest
  (messages between stages and the stage's own dispatch between actions).

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


def lost_time(run_dir: Path, cycle_s: float) -> tuple[float, float]:
    """(median overshoot of an action beyond its emulated time in µs, that overshoot summed
    on the stage with the most of it, in s), from the run's trace and partition."""
    trace = json.loads((run_dir / "trace.json").read_text())
    layers = json.loads((run_dir / "partition.json").read_text())["layers"]
    over: dict[int, list[float]] = {}
    for e in trace["traceEvents"]:
        if e.get("ph") != "X":
            continue
        s = e["args"]["stage"]
        units = _count(str(e["args"]["microbatches"])) if e["cat"] == "update" else 1
        due_us = layers[s] * units * cycle_s * 1e6
        over.setdefault(s, []).append(e["dur"] - due_us)
    every = [x for xs in over.values() for x in xs]
    worst = max(sum(xs) for xs in over.values()) * 1e-6
    return statistics.median(every), worst


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
                overshoot_us, in_actions_s = lost_time(Path(tmp) / "sweep" / r["run_dir"],
                                                       args.cycle_s)  # fmt: skip
                lost_s = r["measured_makespan_s"] - r["predicted_makespan_s"]
                row = {k: r[k] for k in (
                    "policy", "stages", "cycles", "predicted_makespan_s", "measured_makespan_s",
                    "efficiency", "measured_speedup", "predicted_speedup", "overruns",
                )}  # fmt: skip
                row.update(
                    backend=backend,
                    lost_s=lost_s,
                    lost_in_action_overshoot_s=in_actions_s,
                    lost_between_actions_s=lost_s - in_actions_s,
                    median_action_overshoot_us=overshoot_us,
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
                    f"{r['predicted_speedup']:.2f}x), lost {lost_s:.2f} s: "
                    f"{in_actions_s:.2f} s in action overshoot (median {overshoot_us:.0f} µs), "
                    f"{lost_s - in_actions_s:.2f} s between actions; overruns {r['overruns']}"
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
