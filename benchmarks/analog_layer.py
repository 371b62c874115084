"""Time one training step (forward + backward + update) of a 512×512 layer, batch 128.

Two regimes of the pulsed update, because its cost grows with the bit length actually used:

* ``small``: an MSE regression loss against a fixed linear teacher — errors are small, so
  every sample needs about one pulse (BL ≈ 1);
* ``full``: the loss ``sum(y ⊙ G)`` with ``G ~ N(0, 1)`` — errors of order 1 ask every sample
  for more than 31 pulses, so every update runs at the full bit length (BL 31).

Cases, timed round-robin in one process so that a noisy machine slows all alike: digital
``nn.Linear`` + SGD; aimcpipe's expected and pulsed soft-bounds updates (the pulsed one also
with each count kernel forced, to show what the automatic choice picked and why); and, when
IBM aihwkit happens to be importable, its pulsed ``SoftBoundsReferenceDevice`` with the same
τ = 1, dw_min = 1e-3, BL 31 and no device-to-device or cycle-to-cycle variation (never a
dependency of the project). The JSON records the CPU model, cores, torch build and the
kernels chosen.

To time aihwkit too, install it in a separate virtual environment with this project: PyPI
has only its source, which builds in about 12 minutes on 2 cores and needs a C++ compiler,
cmake and OpenBLAS (Debian: ``build-essential cmake libopenblas-dev``; pip: ``scikit-build
pybind11 ninja``; then ``USE_CUDA=OFF SKBUILD_CONFIGURE_OPTIONS="-DRPU_BLAS=OpenBLAS
-DUSE_CUDA=OFF" pip install --no-build-isolation aihwkit==1.2.0``). Its install may replace
torch with a newer CUDA build: put ``torch==2.13.0`` back with ``pip install --no-deps`` (the
extension then still loaded and ran here). Set ``OPENBLAS_NUM_THREADS=1`` when timing:
OpenBLAS's own threads fight torch's on a small machine.

``--label NAME`` files the run under that name in the JSON, keeping the others (one per
machine or setting); the PNG shows every run. Run::

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/analog_layer.py --label NAME
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_info

from aimcpipe.analog import (
    AnalogConfig,
    AnalogLinear,
    AnalogSGD,
    DeviceConfig,
    UpdateConfig,
    counting,
    io_preset,
)

SIZE, BATCH, LR, DW_MIN, TAU, BL = 512, 128, 0.01, 0.001, 1.0, 31
Step = Callable[[], None]
Loss = Callable[[torch.Tensor], torch.Tensor]


def losses(size: int, batch: int) -> dict[str, tuple[torch.Tensor, Loss]]:
    """Per regime: the input batch and the loss of the layer's output."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, size, generator=g)
    teacher = torch.randn(size, size, generator=g) / size**0.5
    target = (x @ teacher.t()).clamp(-1, 1)
    grad = torch.randn(batch, size, generator=g)
    return {
        "small": (x, lambda y: F.mse_loss(y, target)),
        "full": (x, lambda y: (y * grad).sum()),
    }


def step_of(layer: nn.Module, opt, x: torch.Tensor, loss: Loss) -> Step:
    def step() -> None:
        opt.zero_grad()
        loss(layer(x)).backward()
        opt.step()

    return step


def digital(size: int, x, loss) -> Step:
    layer = nn.Linear(size, size)
    return step_of(layer, torch.optim.SGD(layer.parameters(), lr=LR), x, loss)


def ours(size: int, x, loss, config: AnalogConfig, kernel: str = "auto") -> Step:
    layer = AnalogLinear(size, size, config=config, seed=0)
    inner = step_of(layer, AnalogSGD(layer, lr=LR), x, loss)
    if kernel == "auto":
        return inner

    def step() -> None:
        os.environ[counting.ENV] = kernel
        try:
            inner()
        finally:
            os.environ.pop(counting.ENV, None)

    return step


def aihwkit(size: int, x, loss) -> Step:  # pragma: no cover - optional comparison
    from aihwkit.nn import AnalogLinear as AihwkitLinear
    from aihwkit.optim import AnalogSGD as AihwkitSGD
    from aihwkit.simulator.configs import SingleRPUConfig
    from aihwkit.simulator.configs.devices import SoftBoundsReferenceDevice

    device = SoftBoundsReferenceDevice(
        w_max=TAU, w_min=-TAU, dw_min=DW_MIN, dw_min_std=0.0, dw_min_dtod=0.0,
        w_max_dtod=0.0, w_min_dtod=0.0, up_down_dtod=0.0,
    )  # fmt: skip
    config = SingleRPUConfig(device=device)
    config.update.desired_bl = BL
    layer = AihwkitLinear(size, size, rpu_config=config)
    opt = AihwkitSGD(layer.parameters(), lr=LR)
    opt.regroup_param_groups(layer)
    return step_of(layer, opt, x, loss)


def time_cases(
    cases: dict[str, Step], repeats: int, budget_s: float, warmup: int = 2
) -> dict[str, dict[str, float]]:
    """Round-robin: every round runs each case once, so a noisy machine slows all alike. A
    case stops being repeated once it has ``repeats`` samples or has used ``budget_s`` (with
    at least three samples)."""
    for step in cases.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in cases}
    spent = dict.fromkeys(cases, 0.0)
    while True:
        active = [
            n for n in cases
            if len(times[n]) < repeats and (len(times[n]) < 3 or spent[n] < budget_s)
        ]  # fmt: skip
        if not active:
            break
        for name in active:
            start = time.perf_counter()
            cases[name]()
            took = time.perf_counter() - start
            times[name].append(took)
            spent[name] += took
    return {
        name: {
            "median_ms": 1e3 * statistics.median(t),
            "min_ms": 1e3 * min(t),
            "max_ms": 1e3 * max(t),
            "samples": len(t),
        }
        for name, t in times.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--budget-s", type=float, default=20.0, help="time per case at most")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--no-kernels", action="store_true", help="skip the forced kernels")
    parser.add_argument("--label", default="latest", help="name of this run in the JSON")
    parser.add_argument("--out", default="benchmarks/results/analog_layer.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = args.size
    ald = DeviceConfig(kind="soft-bounds", tau=TAU, dw_min=DW_MIN)
    pulsed = UpdateConfig(mode="pulsed", desired_bl=BL)
    paper = io_preset("paper")
    cases: dict[str, Step] = {}
    kernels = [] if args.no_kernels else counting.usable("cpu")
    for regime, (x, loss) in losses(size, BATCH).items():
        cases[f"{regime}: digital nn.Linear + SGD"] = digital(size, x, loss)
        cases[f"{regime}: aimcpipe expected (ideal IO)"] = ours(
            size, x, loss, AnalogConfig(device=ald)
        )
        cases[f"{regime}: aimcpipe pulsed (ideal IO)"] = ours(
            size, x, loss, AnalogConfig(device=ald, update=pulsed)
        )
        cases[f"{regime}: aimcpipe pulsed (paper IO)"] = ours(
            size, x, loss, AnalogConfig(device=ald, update=pulsed, forward=paper, backward=paper)
        )
        for name in kernels:
            cases[f"{regime}: aimcpipe pulsed (ideal IO) [{name}]"] = ours(
                size, x, loss, AnalogConfig(device=ald, update=pulsed), kernel=name
            )
        try:
            cases[f"{regime}: aihwkit pulsed SoftBoundsReference"] = aihwkit(size, x, loss)
        except Exception as exc:  # aihwkit absent or incompatible: say so, time the rest
            print(f"aihwkit not timed: {type(exc).__name__}: {exc}", file=sys.stderr)
    results = time_cases(cases, args.repeats, args.budget_s)
    for regime in ("small", "full"):
        base = results[f"{regime}: digital nn.Linear + SGD"]["median_ms"]
        ref = results.get(f"{regime}: aihwkit pulsed SoftBoundsReference", {}).get("median_ms")
        for name, r in results.items():
            if not name.startswith(regime):
                continue
            r["x_digital"] = r["median_ms"] / base
            if ref is not None:
                r["x_aihwkit"] = r["median_ms"] / ref
            vs = f"  {r['x_aihwkit']:6.3f}x aihwkit" if ref is not None else ""
            print(
                f"{name:58s} median {r['median_ms']:8.2f} ms (min {r['min_ms']:8.2f}, "
                f"n={r['samples']:2d})  {r['x_digital']:7.2f}x digital{vs}"
            )
    try:
        import aihwkit as _aihwkit  # pragma: no cover

        aihwkit_version = _aihwkit.__version__
    except ImportError:
        aihwkit_version = None
    run = {
        "command": "OPENBLAS_NUM_THREADS=1 PYTHONPATH=. python " + " ".join(sys.argv),
        "environment": {
            k: v
            for k, v in os.environ.items()
            if k.endswith("_ISA")
            or "CAPABILITY" in k
            or k.startswith(("MKL_", "OMP_", "OPENBLAS_"))
        },
        "layer": f"{size}x{size}",
        "batch": BATCH,
        "bit_length": BL,
        "threads": args.threads,
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "machine": machine_info(),
        "aihwkit": aihwkit_version,
        "count_kernels_chosen": counting.chosen(),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = json.loads(out.read_text()) if out.exists() else {}
    if "runs" not in record:  # an older single-run file: start over
        record = {"benchmark": "analog_layer", "runs": {}}
    record["runs"][args.label] = run
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"kernels chosen: {counting.chosen()}")
    plot(record, out.with_suffix(".png"))
    return 0


def _num(v: float) -> str:
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def plot(record: dict, path: Path) -> None:
    """Per regime, milliseconds per training step of every case, one bar per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    runs = record["runs"]
    regimes = ("small", "full")
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, regime in zip(axes, regimes, strict=True):
        names = []
        for r in runs.values():
            for name in r["results"]:
                short = name.split(": ", 1)[1]
                if name.startswith(regime) and "[" not in name and short not in names:
                    names.append(short)
        width = 0.8 / max(1, len(runs))
        for i, (label, r) in enumerate(runs.items()):
            ms = [r["results"].get(f"{regime}: {n}", {}).get("median_ms", 0.0) for n in names]
            ys = [j + i * width for j in range(len(names))]
            cpu = r["machine"].get("cpu_model", "?")
            ax.barh(ys, ms, height=width, label=f"{label} ({cpu}, {r['machine']['cpus']} cores)")
            base = r["results"][f"{regime}: digital nn.Linear + SGD"]["median_ms"]
            for y, v in zip(ys, ms, strict=True):
                if v:
                    label_ = f"{_num(v)} ms ({_num(v / base)}x)"
                    ax.text(v * 1.05, y, label_, va="center", fontsize=7)
        ax.set_yticks([j + width * (len(runs) - 1) / 2 for j in range(len(names))], names)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlim(right=ax.get_xlim()[1] * 25)  # room for the labels
        ax.set_xlabel("ms per training step (median, log scale)")
        title = "small updates (BL ~ 1)" if regime == "small" else "full bit length (BL 31)"
        ax.set_title(f"512x512 layer, batch 128: {title}")
        ax.grid(axis="x", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(runs), fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    raise SystemExit(main())
