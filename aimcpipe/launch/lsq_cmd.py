"""``aimcpipe lsq``: the least-squares sweeps of arXiv 2406.12774 (see ``aimcpipe.launch.lsq``).

Two sweeps: ``tau`` (their Fig. 3/4: lr 3e-2, 2500 iterations, τ ∈ {1, 1.5, 2, 2.5},
pulsed dw_min = τ/300) and ``lr`` (their Fig. 1: τ = 1, lr ∈ {1e-1, 3e-2, 1e-2, 3e-3},
``100/lr`` iterations, pulsed dw_min = 1e-4). Writes a table to stdout and, in ``--out``,
``results.json`` (flat list ``runs``), ``curves.json`` (block-averaged loss curves) and PNGs.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from aimcpipe.errors import ConfigError
from aimcpipe.launch.flags import check_size, path_arg
from aimcpipe.launch.lsq import (
    ALGORITHMS,
    MODES,
    PROBLEM_DIM,
    PROBLEM_SAMPLES,
    LsqRun,
    asymptotic_error,
    make_problem,
    run_lsq,
)
from aimcpipe.launch.outdir import check_out_dir, staged_dir
from aimcpipe.launch.train_config import FLOAT32_MAX

__all__ = ["add_arguments", "run"]

log = logging.getLogger(__name__)

SWEEPS = ("tau", "lr")


def _float_list(flag: str, text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: {text!r} is not a comma-separated list of numbers") from None
    if not values or any(not (0 < v <= FLOAT32_MAX) for v in values):
        raise ConfigError(
            f"{flag}: every value must be a number > 0 and at most {FLOAT32_MAX:.3g} "
            f"(float32), got {text!r}"
        )
    return values


def _positive(flag: str, value: float) -> None:
    """A positive float flag: finite and within float32, where the runs compute."""
    if not 0 < value <= FLOAT32_MAX:
        raise ConfigError(
            f"{flag}: must be a number > 0 and at most {FLOAT32_MAX:.3g} (float32), got {value}"
        )


def _choice_list(flag: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ConfigError(
            f"{flag}: {bad[0] if bad else text!r} is not allowed; use a comma-separated "
            f"subset of {','.join(allowed)}"
        )
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--algorithms",
        default=",".join(ALGORITHMS),
        help="comma-separated subset of %(default)s",
    )
    p.add_argument("--modes", default=",".join(MODES), help="device update modes (%(default)s)")
    p.add_argument("--sweeps", default=",".join(SWEEPS), help="which sweeps to run (%(default)s)")
    p.add_argument("--tau", default="1,1.5,2,2.5", help="τ values of the tau sweep")
    p.add_argument("--tau-lr", type=float, default=3e-2, help="learning rate of the tau sweep")
    p.add_argument("--tau-iterations", type=int, default=2500, help="iterations of the tau sweep")
    p.add_argument("--lrs", default="1e-1,3e-2,1e-2,3e-3", help="learning rates of the lr sweep")
    p.add_argument(
        "--lr-budget",
        type=float,
        default=100.0,
        help="lr sweep iterations = budget / lr (default %(default)s)",
    )
    p.add_argument("--replicas", type=int, default=4, help="independent replicas per run")
    p.add_argument(
        "--tt-transfer-ratio",
        type=float,
        default=1.0,
        help="Tiki-Taka transfer lr α as a multiple of its fast-tile lr β (paper: 1)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=path_arg, default=None, help="output directory")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out DIR")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    algorithms = _choice_list("--algorithms", args.algorithms, ALGORITHMS)
    modes = _choice_list("--modes", args.modes, MODES)
    sweeps = _choice_list("--sweeps", args.sweeps, SWEEPS)
    taus = _float_list("--tau", args.tau)
    lrs = _float_list("--lrs", args.lrs)
    if args.tau_iterations < 1:
        raise ConfigError(f"--tau-iterations: must be >= 1, got {args.tau_iterations}")
    _positive("--lr-budget", args.lr_budget)
    _positive("--tau-lr", args.tau_lr)
    _positive("--tt-transfer-ratio", args.tt_transfer_ratio)
    for lr in [*lrs, args.tau_lr]:
        if not args.tt_transfer_ratio * lr <= FLOAT32_MAX:
            raise ConfigError(
                f"--tt-transfer-ratio: {args.tt_transfer_ratio} times the learning rate {lr} "
                f"is beyond float32 ({FLOAT32_MAX:.3g})"
            )
    if args.replicas < 1:
        raise ConfigError(f"--replicas: must be >= 1, got {args.replicas}")
    plan = []
    for sweep in sweeps:
        points = (
            [(tau, args.tau_lr, args.tau_iterations, tau / 300) for tau in taus]
            if sweep == "tau"
            else [(1.0, lr, max(1, round(args.lr_budget / lr)), 1e-4) for lr in lrs]
        )
        for tau, lr, iterations, dw_min in points:
            for mode in modes:
                for algorithm in algorithms:
                    plan.append(
                        dict(
                            sweep=sweep,
                            algorithm=algorithm,
                            mode=mode,
                            tau=tau,
                            lr=lr,
                            iterations=iterations,
                            dw_min=dw_min,
                        )
                    )
    return plan


def _block_means(losses: torch.Tensor, points: int = 250) -> tuple[list[int], list[float]]:
    """Downsample a noisy curve to about ``points`` block means (iteration = block centre)."""
    n = len(losses)
    block = max(1, n // points)
    usable = (n // block) * block
    means = losses[:usable].view(-1, block).mean(dim=1)
    centres = [i * block + block // 2 for i in range(len(means))]
    return centres, [float(v) for v in means]


def _table(runs: list[LsqRun]) -> str:
    lines = []
    for sweep in dict.fromkeys(r.sweep for r in runs):
        rows = [r for r in runs if r.sweep == sweep]
        key = "tau" if sweep == "tau" else "lr"
        values = list(dict.fromkeys(getattr(r, key) for r in rows))
        header = f"{'algorithm':<12} {'mode':<9}" + "".join(f"{key}={v:<9g}" for v in values)
        fixed = f"lr={rows[0].lr:g}" if sweep == "tau" else f"tau={rows[0].tau:g}"
        lines.append(f"\n{sweep} sweep ({fixed}): asymptotic error (mean loss, last 10 %)")
        lines.append(header)
        for algorithm, mode in dict.fromkeys((r.algorithm, r.mode) for r in rows):
            cells = {
                getattr(r, key): r.asymptotic_error
                for r in rows
                if (r.algorithm, r.mode) == (algorithm, mode)
            }
            lines.append(
                f"{algorithm:<12} {mode:<9}"
                + "".join(f"{cells[v]:<{len(key) + 10}.3e}" for v in values)
            )
    return "\n".join(lines)


# lower bounds for the size check, measured with the default problem (dim 40, 100 samples):
# ~25 µs per iteration of Python and small-tensor overhead, and 1e10 multiply-adds a second
_SECONDS_PER_ITERATION = 2.5e-5
_MACS_PER_SECOND = 1e10


def _check_lsq_size(plan: list[dict[str, Any]], replicas: int, dim: int, samples: int) -> None:
    """Refuse a plan that would not fit or finish: each run holds an R × R identity and a
    few R × D tiles (float64), and each iteration costs ~R·D·(R + 2·samples) multiply-adds."""
    iterations = sum(p["iterations"] for p in plan)
    need = 8 * (replicas * replicas + 8 * replicas * dim + max(p["iterations"] for p in plan))
    macs = iterations * replicas * dim * (replicas + 2 * samples)
    check_size(
        "--replicas/--tau-iterations/--lr-budget",
        f"{len(plan)} runs of {iterations:,} iterations in all with {replicas:,} replicas",
        need,
        iterations * _SECONDS_PER_ITERATION + macs / _MACS_PER_SECOND,
    )


def run(args: argparse.Namespace) -> int:
    plan = _plan(args)
    _check_lsq_size(plan, args.replicas, PROBLEM_DIM, PROBLEM_SAMPLES)
    out = check_out_dir(args.out, force=args.force)
    torch.set_num_threads(1)  # the problem is tiny: threads only add overhead
    problem = make_problem(args.seed)
    runs: list[LsqRun] = []
    curves: list[dict[str, Any]] = []
    cache: dict[tuple, torch.Tensor] = {}
    total = sum(p["iterations"] for p in plan)
    start = time.perf_counter()
    with tqdm(
        total=total, unit="it", disable=True if args.no_progress else None, desc="lsq"
    ) as bar:
        for point in plan:
            bar.set_postfix_str(
                f"{point['sweep']} {point['algorithm']} {point['mode']}", refresh=False
            )
            # digital-sgd has no device: both mode labels are the same run.
            key = (
                tuple(point.values())
                if point["algorithm"] != "digital-sgd"
                else (point["sweep"], point["tau"], point["lr"], point["iterations"])
            )
            if key in cache:
                losses = cache[key]
                bar.update(point["iterations"])
            else:
                losses = run_lsq(
                    problem,
                    algorithm=point["algorithm"],
                    mode=point["mode"],
                    tau=point["tau"],
                    lr=point["lr"],
                    iterations=point["iterations"],
                    dw_min=point["dw_min"],
                    replicas=args.replicas,
                    transfer_ratio=args.tt_transfer_ratio,
                    seed=args.seed,
                    progress=bar.update,
                )
                cache[key] = losses
            runs.append(
                LsqRun(asymptotic_error=asymptotic_error(losses), replicas=args.replicas, **point)
            )
            its, values = _block_means(losses)
            curves.append({**runs[-1].as_dict(), "iteration": its, "loss": values})
    print(_table(runs))
    log.info("lsq: %d runs in %.1f s", len(runs), time.perf_counter() - start)
    if out is not None:
        _write(out, runs, curves, args)
        print(f"\nwrote {out}/results.json, curves.json and plots")
    return 0


def _write(
    out: Path, runs: list[LsqRun], curves: list[dict[str, Any]], args: argparse.Namespace
) -> None:
    """Write results, curves and plots (complete or not at all: ``staged_dir``)."""
    with staged_dir(out) as tmp:
        settings = {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if not k.startswith("_")
        }
        (tmp / "results.json").write_text(
            json.dumps({"settings": settings, "runs": [r.as_dict() for r in runs]}, indent=2) + "\n"
        )
        (tmp / "curves.json").write_text(json.dumps({"curves": curves}) + "\n")
        from aimcpipe.launch.lsq_plots import plot_lsq

        plot_lsq(curves, runs, tmp)
