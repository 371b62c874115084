"""Time one training step (forward + backward + update) of a 512×512 layer, batch 128.

Compares digital ``nn.Linear`` + SGD with aimcpipe's analog layer under the expected and the
pulsed soft-bounds (ALD) update, on CPU with 2 threads. If IBM aihwkit happens to be
importable, its pulsed SoftBoundsReferenceDevice tile is timed side by side (never a
dependency).

Run:  .venv/bin/python benchmarks/analog_layer.py [--repeats 50] [--out FILE.json]
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

import torch
from torch import nn

from aimcpipe.analog import (
    AnalogConfig,
    AnalogLinear,
    AnalogSGD,
    DeviceConfig,
    UpdateConfig,
    io_preset,
)

SIZE, BATCH, LR = 512, 128, 0.01
# The loss sum(y ⊙ G) with G ~ N(0, 1) backpropagates errors of order 1, so with lr 0.01 and
# dw_min 0.001 every sample asks for more than 31 pulses: the pulsed update always runs at
# the full bit length (its most expensive case).


def time_cases(cases: dict, repeats: int, warmup: int = 5) -> dict[str, dict[str, float]]:
    """Time every case ``repeats`` times, round-robin, so that a noisy machine slows all cases
    alike; report the median and the minimum per case."""
    for step in cases.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, step in cases.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {
        name: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t)}
        for name, t in times.items()
    }


def digital_step(x: torch.Tensor, g: torch.Tensor):
    layer = nn.Linear(SIZE, SIZE)
    opt = torch.optim.SGD(layer.parameters(), lr=LR)

    def step() -> None:
        opt.zero_grad()
        (layer(x) * g).sum().backward()
        opt.step()

    return step


def analog_step(x: torch.Tensor, g: torch.Tensor, config: AnalogConfig):
    layer = AnalogLinear(SIZE, SIZE, config=config, seed=0)
    opt = AnalogSGD(layer, lr=LR)

    def step() -> None:
        opt.zero_grad()
        (layer(x) * g).sum().backward()
        opt.step()

    return step


def aihwkit_step(x: torch.Tensor, g: torch.Tensor):  # pragma: no cover - optional comparison
    from aihwkit.nn import AnalogLinear as AihwkitLinear
    from aihwkit.optim import AnalogSGD as AihwkitSGD
    from aihwkit.simulator.configs import SingleRPUConfig
    from aihwkit.simulator.configs.devices import SoftBoundsReferenceDevice

    layer = AihwkitLinear(
        SIZE, SIZE, rpu_config=SingleRPUConfig(device=SoftBoundsReferenceDevice())
    )
    opt = AihwkitSGD(layer.parameters(), lr=LR)
    opt.regroup_param_groups(layer)

    def step() -> None:
        opt.zero_grad()
        (layer(x) * g).sum().backward()
        opt.step()

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/analog_layer.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(BATCH, SIZE)
    g = torch.randn(BATCH, SIZE)
    ald = DeviceConfig(kind="soft-bounds", tau=1.0, dw_min=0.001)
    cases = {
        "digital nn.Linear + SGD": digital_step(x, g),
        "analog expected ALD (ideal IO)": analog_step(x, g, AnalogConfig(device=ald)),
        "analog expected ALD (paper IO)": analog_step(
            x, g, AnalogConfig(device=ald, forward=io_preset("paper"), backward=io_preset("paper"))
        ),
        "analog pulsed ALD bl31 (ideal IO)": analog_step(
            x, g, AnalogConfig(device=ald, update=UpdateConfig(mode="pulsed", desired_bl=31))
        ),
        "analog pulsed ALD bl31 + c2c/dtod (paper IO)": analog_step(
            x,
            g,
            AnalogConfig(
                device=DeviceConfig(tau=1.0, dw_min=0.001, dw_min_std=0.3, dw_min_dtod=0.3),
                update=UpdateConfig(mode="pulsed", desired_bl=31),
                forward=io_preset("paper"),
                backward=io_preset("paper"),
            ),
        ),
    }
    try:
        cases["aihwkit pulsed SoftBoundsReference"] = aihwkit_step(x, g)
    except Exception as exc:
        print(f"aihwkit not timed: {type(exc).__name__}: {exc}", file=sys.stderr)
    results = time_cases(cases, args.repeats)
    base = next(iter(results.values()))
    for name, r in results.items():
        r["x_digital_median"] = r["median_ms"] / base["median_ms"]
        r["x_digital_min"] = r["min_ms"] / base["min_ms"]
        print(
            f"{name:46s} median {r['median_ms']:7.2f} ms ({r['x_digital_median']:5.2f}x digital)"
            f"  min {r['min_ms']:7.2f} ms ({r['x_digital_min']:5.2f}x)"
        )
    record = {
        "command": "python " + " ".join(sys.argv),
        "layer": f"{SIZE}x{SIZE}",
        "batch": BATCH,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
