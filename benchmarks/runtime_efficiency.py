"""How much of a schedule's timing survives the runtime: emulated device time, measured.

With ``device_time.cycle_s`` set every action lasts at least its cost × cycle_s (the host
waits out the rest), so on a small machine the stages behave like accelerators. Runtime
efficiency = predicted makespan (the cost model's cycles for the executed actions × cycle_s)
/ measured makespan (first action start to last action end over all stages, clocks
aligned). 1.0 means the runtime adds nothing; the gap is per-message transport, sleep
jitter and the scheduler's dispatch.

One epoch of the digits analog network (4 blocks), partitioned into S = 2 and 4 stages, for
wop, sync-1f1b and async, on the torch and Ray backends, F = B = U = 1 cycle, at two cycle
times: host compute fits inside an action at both (overruns are reported), and the runtime's
fixed cost per hop between stages weighs less at the longer one. Run::

    PYTHONPATH=. .venv/bin/python benchmarks/runtime_efficiency.py --repeats 3 --cycle-s 0.01,0.03

Results: ``benchmarks/results/runtime_efficiency.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info

from aimcpipe.analog import AnalogConfig, DeviceConfig, convert
from aimcpipe.runtime import Pipeline, load_dataset
from aimcpipe.runtime.backends import make_backend
from aimcpipe.runtime.options import RuntimeOptions
from aimcpipe.stages import build_model

POLICIES = ("wop", "sync-1f1b", "async")
TARGET = {"torch": 0.95, "ray": 0.90}


def one_epoch(backend, stages: int, policy: str, train, cycle_s: float) -> dict:
    model = convert(
        build_model("digits-fcn", seed=0), AnalogConfig(device=DeviceConfig(tau=1.0)), seed=0
    )
    with Pipeline(
        model, stages=stages, policy=policy, microbatches=4, microbatch_size=8, lr=0.1,
        cycle_s=cycle_s, progress=False, backend=backend,
    ) as pipe:  # fmt: skip
        m = pipe.fit(train, epochs=1).to_dict()
        records = pipe._trace  # this epoch's actions, all stages, on one clock
    t = m["device_time"]
    hops, excess = where_the_time_goes(records, cycle_s)
    return {
        "hop_ms": 1e3 * statistics.median(hops) if hops else 0.0,
        "excess_ms": 1e3 * statistics.median(excess),
        "efficiency": t["efficiency"],
        "predicted_s": t["predicted_s"],
        "measured_s": t["measured_s"],
        "cycles": m["cycles"]["makespan"],
        "overruns": sum(m["measured"]["overruns"]),
    }


def where_the_time_goes(records, cycle_s: float) -> tuple[list[float], list[float]]:
    """Per message: from the end of the action that sent it to the start of the action that
    needed it, when that action had nothing else to do first (its stage's previous action had
    ended before the message's sender did) — the transport's cost on the critical path. Per
    action: how much longer than its emulated time it lasted (sleep overshoot)."""
    ends = {(r.action.kind, s, r.action.microbatches): r.end for s, rs in enumerate(records)
            for r in rs}  # fmt: skip
    hops, excess = [], []
    for s, rs in enumerate(records):
        for prev, r in zip([None, *rs[:-1]], rs, strict=True):
            kind, mbs = r.action.kind, r.action.microbatches
            src = (kind, s - 1, mbs) if kind == "F" else (kind, s + 1, mbs)
            if kind in "FB" and src in ends and (prev is None or prev.end <= ends[src]):
                hops.append(r.start - ends[src])
            units = len(mbs) if kind == "U" else 1
            excess.append(r.end - r.start - units * cycle_s)
    return hops, excess


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    cycles = sorted({r["cycle_s"] for r in rows})
    fig, axes = plt.subplots(1, len(backends), figsize=(5 * len(backends), 3.8), squeeze=False)
    for ax, backend in zip(axes[0], backends, strict=True):
        for i, policy in enumerate(POLICIES):
            for cycle, style in zip(cycles, ("--", "-", ":"), strict=False):
                pts = [(r["stages"], r["efficiency"]) for r in rows if r["backend"] == backend
                       and r["policy"] == policy and r["cycle_s"] == cycle]  # fmt: skip
                ax.plot(*zip(*pts, strict=True), marker="o", ls=style, color=f"C{i}",
                        label=f"{policy}, cycle {cycle * 1e3:g} ms")  # fmt: skip
        ax.axhline(TARGET[backend], color="grey", ls="--", lw=1, label=f"target {TARGET[backend]}")
        ax.set_title(f"{backend} backend")
        ax.set_xlabel("stages")
        ax.set_ylabel("predicted / measured makespan")
        ax.set_ylim(0.8, 1.01)
        ax.set_xticks(sorted({r["stages"] for r in rows}))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=7)
    fig.suptitle("runtime efficiency with emulated device time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cycle-s", default="0.01,0.03", help="seconds per cycle (list)")
    parser.add_argument("--samples", type=int, default=640, help="training samples (an epoch)")
    parser.add_argument("--backends", default="torch,ray")
    parser.add_argument("--stages", default="2,4")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    train, _ = load_dataset("digits")
    train = train.subset(torch.arange(args.samples))
    rows = []
    cycles = [float(c) for c in args.cycle_s.split(",")]
    for name in args.backends.split(","):
        for stages in (int(s) for s in args.stages.split(",")):
            started = time.perf_counter()
            backend = make_backend(name, RuntimeOptions(timeout_s=120))
            runs: dict[tuple[float, str], list[dict]] = {}
            try:
                one_epoch(backend, stages, "wop", train, 1e-4)  # warm-up: first-call costs
                for _ in range(args.repeats):  # cases interleaved on the same processes
                    for cycle in cycles:
                        for policy in POLICIES:
                            result = one_epoch(backend, stages, policy, train, cycle)
                            runs.setdefault((cycle, policy), []).append(result)
            finally:
                backend.close()
            for (cycle, policy), results in runs.items():
                eff = [r["efficiency"] for r in results]
                row = {
                    "backend": name, "stages": stages, "policy": policy, "cycle_s": cycle,
                    "efficiency": statistics.median(eff), "efficiency_min": min(eff),
                    "efficiency_max": max(eff),
                    "predicted_s": results[0]["predicted_s"],
                    "measured_s": statistics.median(r["measured_s"] for r in results),
                    "cycles": results[0]["cycles"],
                    "overruns": max(r["overruns"] for r in results),
                    "hop_ms": statistics.median(r["hop_ms"] for r in results),
                    "action_excess_ms": statistics.median(r["excess_ms"] for r in results),
                    "meets_target": statistics.median(eff) >= TARGET[name],
                }  # fmt: skip
                rows.append(row)
                print(
                    f"{name:5s} S={stages} cycle {cycle * 1e3:g} ms {policy:9s} "
                    f"efficiency {row['efficiency']:.3f} "
                    f"(min {row['efficiency_min']:.3f}, max {row['efficiency_max']:.3f}), "
                    f"predicted {row['predicted_s']:.2f} s, measured {row['measured_s']:.2f} s, "
                    f"overruns {row['overruns']}; per hop {row['hop_ms']:.2f} ms, "
                    f"per action +{row['action_excess_ms']:.2f} ms"
                )
            print(f"  ({time.perf_counter() - started:.0f} s with start-up)")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "runtime_efficiency",
        "command": "PYTHONPATH=. .venv/bin/python benchmarks/runtime_efficiency.py "
        f"--repeats {args.repeats} --cycle-s {args.cycle_s} --samples {args.samples}",
        "machine": machine_info(),
        "targets": TARGET,
        "results": rows,
    }
    (args.out / "runtime_efficiency.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(rows, args.out / "runtime_efficiency.png")


if __name__ == "__main__":
    main()
