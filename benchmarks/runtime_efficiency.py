"""How much of a schedule's timing survives the runtime: emulated device time, measured.

With ``device_time.cycle_s`` set every action lasts at least its cost × cycle_s (the host
waits out the rest), so on a small machine the stages behave like accelerators. Runtime
efficiency = predicted makespan (the cost model's cycles for the executed actions × cycle_s)
/ measured makespan (first action start to last action end over all stages, clocks
aligned). 1.0 means the runtime adds nothing; the gap is per-message transport, sleep
jitter and the scheduler's dispatch.

One epoch of the digits analog network (4 blocks), partitioned into S = 2 and 4 stages, for
wop, sync-1f1b and async, on the torch and Ray backends, F = B = U = 1 cycle. ``cycle_s``
is chosen so that one action's host compute fits inside it (overruns are reported). Run::

    PYTHONPATH=. .venv/bin/python benchmarks/runtime_efficiency.py --repeats 3

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
    t = m["device_time"]
    return {
        "efficiency": t["efficiency"],
        "predicted_s": t["predicted_s"],
        "measured_s": t["measured_s"],
        "cycles": m["cycles"]["makespan"],
        "overruns": sum(m["measured"]["overruns"]),
        "actions": None,
    }


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, axes = plt.subplots(1, len(backends), figsize=(5 * len(backends), 3.8), squeeze=False)
    for ax, backend in zip(axes[0], backends, strict=True):
        for policy in POLICIES:
            pts = [(r["stages"], r["efficiency"]) for r in rows
                   if r["backend"] == backend and r["policy"] == policy]  # fmt: skip
            ax.plot(*zip(*pts, strict=True), marker="o", label=policy)
        ax.axhline(TARGET[backend], color="grey", ls="--", lw=1, label=f"target {TARGET[backend]}")
        ax.set_title(f"{backend} backend")
        ax.set_xlabel("stages")
        ax.set_ylabel("predicted / measured makespan")
        ax.set_ylim(0.8, 1.01)
        ax.set_xticks(sorted({r["stages"] for r in rows}))
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left")
    fig.suptitle("runtime efficiency with emulated device time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cycle-s", type=float, default=0.01)
    parser.add_argument("--samples", type=int, default=640, help="training samples (an epoch)")
    parser.add_argument("--backends", default="torch,ray")
    parser.add_argument("--stages", default="2,4")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    train, _ = load_dataset("digits")
    train = train.subset(torch.arange(args.samples))
    rows = []
    for name in args.backends.split(","):
        for stages in (int(s) for s in args.stages.split(",")):
            started = time.perf_counter()
            backend = make_backend(name, RuntimeOptions(timeout_s=120))
            try:
                runs: dict[str, list[dict]] = {p: [] for p in POLICIES}
                for _ in range(args.repeats):  # policies interleaved on the same processes
                    for policy in POLICIES:
                        runs[policy].append(one_epoch(backend, stages, policy, train, args.cycle_s))
            finally:
                backend.close()
            for policy, results in runs.items():
                eff = [r["efficiency"] for r in results]
                row = {
                    "backend": name, "stages": stages, "policy": policy,
                    "efficiency": statistics.median(eff), "efficiency_min": min(eff),
                    "efficiency_max": max(eff),
                    "predicted_s": results[0]["predicted_s"],
                    "measured_s": statistics.median(r["measured_s"] for r in results),
                    "cycles": results[0]["cycles"],
                    "overruns": max(r["overruns"] for r in results),
                    "meets_target": statistics.median(eff) >= TARGET[name],
                }  # fmt: skip
                rows.append(row)
                print(
                    f"{name:5s} S={stages} {policy:9s} efficiency {row['efficiency']:.3f} "
                    f"(min {row['efficiency_min']:.3f}, max {row['efficiency_max']:.3f}), "
                    f"predicted {row['predicted_s']:.2f} s, measured {row['measured_s']:.2f} s, "
                    f"overruns {row['overruns']}"
                )
            print(f"  ({time.perf_counter() - started:.0f} s with start-up)")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "runtime_efficiency",
        "command": "PYTHONPATH=. .venv/bin/python benchmarks/runtime_efficiency.py "
        f"--repeats {args.repeats} --cycle-s {args.cycle_s} --samples {args.samples}",
        "machine": machine_info(),
        "cycle_s": args.cycle_s,
        "targets": TARGET,
        "results": rows,
    }
    (args.out / "runtime_efficiency.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(rows, args.out / "runtime_efficiency.png")


if __name__ == "__main__":
    main()
