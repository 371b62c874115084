"""PNG plots of the least-squares sweeps (matplotlib, from the ``plot`` extra)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

__all__ = ["plot_lsq"]

log = logging.getLogger(__name__)

COLORS = {"digital-sgd": "tab:blue", "analog-sgd": "tab:red", "tiki-taka": "tab:green"}
STYLES = {"expected": "-", "pulsed": "--"}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install matplotlib): no plots")
        return None
    return plt


def _curve_grid(plt, curves: list[dict[str, Any]], sweep: str, path: Path) -> None:
    rows = [c for c in curves if c["sweep"] == sweep]
    if not rows:
        return
    key = "tau" if sweep == "tau" else "lr"
    values = list(dict.fromkeys(c[key] for c in rows))
    modes = list(dict.fromkeys(c["mode"] for c in rows))
    fig, axes = plt.subplots(
        len(modes),
        len(values),
        figsize=(3.2 * len(values), 2.8 * len(modes)),
        sharey=True,
        squeeze=False,
    )
    for i, mode in enumerate(modes):
        for j, value in enumerate(values):
            ax = axes[i][j]
            for c in rows:
                if c["mode"] == mode and c[key] == value:
                    ax.plot(
                        c["iteration"],
                        c["loss"],
                        color=COLORS.get(c["algorithm"]),
                        lw=1.2,
                        label=c["algorithm"],
                    )
            ax.set_yscale("log")
            ax.set_title(f"{mode}, {key}={value:g}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if i == len(modes) - 1:
                ax.set_xlabel("iteration")
            if j == 0:
                ax.set_ylabel("loss f(W)")
    axes[0][0].legend(fontsize=8)
    fixed = rows[0]
    title = (
        f"least squares, {key} sweep (lr={fixed['lr']:g})"
        if sweep == "tau"
        else f"least squares, lr sweep (tau={fixed['tau']:g}, "
        f"{fixed['iterations'] * fixed['lr']:g}/lr iterations)"
    )
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary(plt, runs: list[Any], path: Path) -> None:
    sweeps = list(dict.fromkeys(r.sweep for r in runs))
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5.2 * len(sweeps), 3.8), squeeze=False)
    for ax, sweep in zip(axes[0], sweeps, strict=True):
        key = "tau" if sweep == "tau" else "lr"
        rows = [r for r in runs if r.sweep == sweep]
        for algorithm, mode in dict.fromkeys((r.algorithm, r.mode) for r in rows):
            if algorithm == "digital-sgd" and mode != rows[0].mode:
                continue  # digital has no device: the same run under both labels
            pts = sorted(
                (getattr(r, key), r.asymptotic_error)
                for r in rows
                if (r.algorithm, r.mode) == (algorithm, mode)
            )
            label = algorithm if algorithm == "digital-sgd" else f"{algorithm} ({mode})"
            ax.plot(
                *zip(*pts, strict=True),
                marker="o",
                color=COLORS.get(algorithm),
                ls=STYLES.get(mode, "-"),
                label=label,
            )
        ax.set_yscale("log")
        if key == "lr":
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("asymptotic error (mean loss, last 10 %)")
        ax.set_title(f"{sweep} sweep")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lsq(curves: list[dict[str, Any]], runs: list[Any], out: Path) -> list[Path]:
    """Write ``lsq_tau.png``, ``lsq_lr.png`` (loss curves) and ``lsq_summary.png``
    (asymptotic error vs τ and vs lr); returns the files written (none without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return []
    written = []
    for sweep in ("tau", "lr"):
        path = out / f"lsq_{sweep}.png"
        _curve_grid(plt, curves, sweep, path)
        if path.exists():
            written.append(path)
    _summary(plt, runs, out / "lsq_summary.png")
    written.append(out / "lsq_summary.png")
    return written
