"""Overhead of the in-process pipeline runtime over a plain training loop.

One epoch of the digits analog FCN (64-64-48-32-10, soft-bounds τ=1, expected updates,
micro-batches of 8, Bm=4), timed for:

* ``plain``: the whole model, forward/backward per micro-batch, ``AnalogSGD.step`` per
  mini-batch (no stages, no schedule) — the floor;
* ``wop S=1``, ``sync-1f1b S=4``, ``async S=4``: ``Pipeline.train_epoch`` on the in-process
  backend (same numerics as ``plain`` for wop/sync).

Cases are interleaved and repeated; medians are reported. The overhead per action is
``(pipeline − plain) / actions``. Run::

    PYTHONPATH=. .venv/bin/python benchmarks/pipeline_overhead.py --repeats 7 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from aimcpipe.analog import AnalogConfig, AnalogSGD, DeviceConfig, convert
from aimcpipe.runtime import Pipeline, epoch_order, load_dataset
from aimcpipe.stages import build_model

CONFIG = AnalogConfig(rule="analog-sgd", device=DeviceConfig(kind="soft-bounds", tau=1.0))
BM, MB = 4, 8


def _model():
    return convert(build_model("digits-fcn", seed=0), CONFIG, seed=0)


def plain_epoch(train) -> float:
    model = _model()
    opt = AnalogSGD(model, lr=0.1)
    order = epoch_order(len(train), 0, 0)
    k = len(train) // (BM * MB)
    start = time.perf_counter()
    for mb in range(k):
        opt.zero_grad()
        for i in range(BM):
            idx = order[(mb * BM + i) * MB : (mb * BM + i + 1) * MB]
            F.cross_entropy(model(train.x[idx]), train.y[idx]).backward()
        opt.step(scale=1 / BM)
    return time.perf_counter() - start


def pipeline_epoch(train, policy: str, stages: int) -> tuple[float, int]:
    pipe = Pipeline(
        _model(), stages=stages, policy=policy, microbatches=BM, microbatch_size=MB,
        progress=False,
    )  # fmt: skip
    start = time.perf_counter()
    result = pipe.train_epoch(train, 0)
    elapsed = time.perf_counter() - start
    del result
    actions = pipe.schedule_for(len(train) // (BM * MB)).num_actions
    return elapsed, actions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, _ = load_dataset("digits")
    cases = {"plain": None, "wop S=1": ("wop", 1), "sync-1f1b S=4": ("sync-1f1b", 4),
             "async S=4": ("async", 4)}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in cases}
    actions: dict[str, int] = {}
    plain_epoch(train)  # warm-up
    for _ in range(args.repeats):
        for name, case in cases.items():
            if case is None:
                times[name].append(plain_epoch(train))
            else:
                t, n = pipeline_epoch(train, *case)
                times[name].append(t)
                actions[name] = n
    base = statistics.median(times["plain"])
    rows = []
    for name in cases:
        med = statistics.median(times[name])
        row = {"case": name, "median_s": med, "min_s": min(times[name]), "vs_plain": med / base}
        if name in actions:
            row["actions"] = actions[name]
            row["overhead_us_per_action"] = 1e6 * (med - base) / actions[name]
        rows.append(row)
        extra = (
            f"  {row['actions']} actions, {row['overhead_us_per_action']:.0f} us/action overhead"
            if "actions" in row
            else ""
        )
        print(f"{name:15s} {med * 1e3:8.1f} ms  ({row['vs_plain']:.2f}x plain){extra}")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "pipeline_overhead",
        "command": "PYTHONPATH=. .venv/bin/python benchmarks/pipeline_overhead.py "
        f"--repeats {args.repeats} --threads {args.threads}",
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.platform(),
        "samples_per_epoch": len(train) // (BM * MB) * BM * MB,
        "results": rows,
    }
    (args.out / "pipeline_overhead.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
