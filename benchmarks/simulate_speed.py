"""Time build + validate + simulate of a large schedule (target: < 1 s on one core).

    PYTHONPATH=. python benchmarks/simulate_speed.py [--stages 8] [--microbatches 10000]

Reports min and median over repeats for each phase and for the whole pipeline, and writes
benchmarks/results/simulate_speed.json with the command and machine information.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from aimcpipe.scheduler import CostModel, build_schedule, simulate, validate

RESULTS = Path(__file__).resolve().parent / "results" / "simulate_speed.json"


def time_once(policy: str, stages: int, microbatches: int) -> dict[str, float]:
    t0 = time.perf_counter()
    sched = build_schedule(policy, stages, microbatches)
    t1 = time.perf_counter()
    validate(sched)
    t2 = time.perf_counter()
    result = simulate(sched, CostModel(), check=False)  # validated just above
    t3 = time.perf_counter()
    assert result.makespan > 0
    return {
        "build_s": t1 - t0,
        "validate_s": t2 - t1,
        "simulate_s": t3 - t2,
        "total_s": t3 - t0,
        "actions": sched.num_actions,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=8)
    parser.add_argument("--microbatches", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--policies", default="async,sync-1f1b,wop")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    report: dict[str, object] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        },
        "stages": args.stages,
        "microbatches": args.microbatches,
        "repeats": args.repeats,
        "target_s": 1.0,
        "results": {},
    }
    for policy in args.policies.split(","):
        runs = [time_once(policy, args.stages, args.microbatches) for _ in range(args.repeats)]
        summary: dict[str, object] = {"actions": runs[0]["actions"]}
        for key in ("build_s", "validate_s", "simulate_s", "total_s"):
            values = [r[key] for r in runs]
            summary[key] = {"min": min(values), "median": statistics.median(values)}
        report["results"][policy] = summary  # type: ignore[index]
        total = summary["total_s"]
        print(
            f"{policy:10s} S={args.stages} Bm={args.microbatches} actions={runs[0]['actions']:>7}"
            f"  build+validate+simulate: min {total['min']:.3f} s"  # type: ignore[index]
            f"  median {total['median']:.3f} s"  # type: ignore[index]
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
