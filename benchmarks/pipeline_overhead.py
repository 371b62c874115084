"""Overhead of the in-process pipeline runtime over a plain training loop.

One epoch of the digits analog FCN (64-64-48-32-10, soft-bounds τ=1, expected updates,
micro-batches of 8, Bm=4), timed for:

* ``plain``: the whole model, forward/backward per micro-batch, ``AnalogSGD.step`` per
  mini-batch (no stages, no schedule) — the floor;
* ``wop S=1``, ``sync-1f1b S=4``, ``async S=4``: ``Pipeline.train_epoch`` on the in-process
  backend (same numerics as ``plain`` for wop/sync).

Every case is built once and warmed up by one epoch; then warm epochs are timed,
interleaved round-robin (so a noisy machine slows all alike), and medians reported. The
overhead per action is ``(pipeline − plain) / actions``: what the runtime adds to each
action on every backend, before any message leaves the process.

``--label NAME`` files the run under that name in the JSON, keeping the others, so that the
same script run on two versions of the code records before and after side by side::

    PYTHONPATH=. .venv/bin/python benchmarks/pipeline_overhead.py --repeats 15 --label after
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info

from aimcpipe.analog import AnalogConfig, AnalogSGD, DeviceConfig, convert
from aimcpipe.runtime import Pipeline, epoch_order, load_dataset
from aimcpipe.stages import build_model

CONFIG = AnalogConfig(rule="analog-sgd", device=DeviceConfig(kind="soft-bounds", tau=1.0))
BM, MB = 4, 8
CASES = {"wop S=1": ("wop", 1), "sync-1f1b S=4": ("sync-1f1b", 4), "async S=4": ("async", 4)}
TARGET_US, TARGET_SYNC_RATIO = 50.0, 1.5


def _model():
    return convert(build_model("digits-fcn", seed=0), CONFIG, seed=0)


class Plain:
    """The floor: the training loop a user would write, no stages and no schedule."""

    def __init__(self, train) -> None:
        self.train = train
        self.model = _model()
        self.opt = AnalogSGD(self.model, lr=0.1)

    def epoch(self, epoch: int) -> float:
        train, model, opt = self.train, self.model, self.opt
        order = epoch_order(len(train), 0, epoch)
        start = time.perf_counter()
        for mb in range(len(train) // (BM * MB)):
            opt.zero_grad()
            for i in range(BM):
                idx = order[(mb * BM + i) * MB : (mb * BM + i + 1) * MB]
                F.cross_entropy(model(train.x[idx]), train.y[idx]).backward()
            opt.step(scale=1 / BM)
        return time.perf_counter() - start


class Piped:
    def __init__(self, train, policy: str, stages: int) -> None:
        self.train = train
        self.pipe = Pipeline(
            _model(), stages=stages, policy=policy, microbatches=BM, microbatch_size=MB,
            progress=False,
        )  # fmt: skip
        self.actions = self.pipe.schedule_for(len(train) // (BM * MB)).num_actions

    def epoch(self, epoch: int) -> float:
        start = time.perf_counter()
        self.pipe.train_epoch(self.train, epoch)
        return time.perf_counter() - start


def _commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        return out.stdout.strip() + ("+changes" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--label", default="latest", help="name of this run in the JSON")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, _ = load_dataset("digits")
    cases = {"plain": Plain(train), **{n: Piped(train, *c) for n, c in CASES.items()}}
    for case in cases.values():  # warm-up: first-epoch set-up is not per-action overhead
        case.epoch(0)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(args.repeats):
        for name, case in cases.items():
            times[name].append(case.epoch(r + 1))
    base = statistics.median(times["plain"])
    rows = []
    for name, case in cases.items():
        med = statistics.median(times[name])
        row = {
            "case": name,
            "median_s": med,
            "min_s": min(times[name]),
            "max_s": max(times[name]),
            "vs_plain": med / base,
        }
        extra = ""
        if isinstance(case, Piped):
            row["actions"] = case.actions
            row["overhead_us_per_action"] = 1e6 * (med - base) / case.actions
            extra = f"  {case.actions} actions, {row['overhead_us_per_action']:.1f} us/action"
        rows.append(row)
        print(f"{name:15s} {med * 1e3:8.1f} ms  ({row['vs_plain']:.2f}x plain){extra}")
    worst = max(r["overhead_us_per_action"] for r in rows if "actions" in r)
    sync = next(r for r in rows if r["case"] == "sync-1f1b S=4")["vs_plain"]
    verdict = {
        "worst_overhead_us_per_action": worst,
        "sync_s4_vs_plain": sync,
        "target_us_per_action": TARGET_US,
        "target_sync_s4_vs_plain": TARGET_SYNC_RATIO,
        "met": worst <= TARGET_US and sync <= TARGET_SYNC_RATIO,
    }
    print(
        f"worst {worst:.1f} us/action (target <= {TARGET_US:.0f}), sync-1f1b S=4 "
        f"{sync:.2f}x plain (target <= {TARGET_SYNC_RATIO}): "
        + ("met" if verdict["met"] else "NOT met")
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "pipeline_overhead.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    if "runs" not in record:  # an older single-run file: start over
        record = {"benchmark": "pipeline_overhead", "runs": {}}
    record["runs"][args.label] = {
        "command": "PYTHONPATH=. .venv/bin/python benchmarks/pipeline_overhead.py "
        f"--repeats {args.repeats} --threads {args.threads} --label {args.label}",
        "commit": _commit(),
        "threads": args.threads,
        "machine": machine_info(),
        "samples_per_epoch": len(train) // (BM * MB) * BM * MB,
        "results": rows,
        "verdict": verdict,
    }
    path.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
