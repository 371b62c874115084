"""Plots of a speedup sweep (``aimcpipe speedup``), from the records of ``speedup.json``:

* ``speedup.png``: measured and predicted speedup vs stage count per policy, the ideal line
  (= S) and the closed forms; beside it the runtime efficiency (predicted / measured makespan);
* ``utilization.png``: each stage's utilization, measured (bars) and predicted (ticks), per
  policy and stage count;
* ``accuracy.png``: test accuracy vs epoch and vs cycles, one line per policy and stage count.

matplotlib is imported only when plotting; without it the plots are skipped with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aimcpipe.scheduler import closed_form_speedup

__all__ = ["plot_sweep"]

log = logging.getLogger(__name__)

Record = dict[str, Any]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no plots (pip install matplotlib)")
        return None
    return plt


def _by_policy(records: Sequence[Record]) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {}
    for r in records:
        out.setdefault(r["policy"], []).append(r)
    for rows in out.values():
        rows.sort(key=lambda r: r["stages"])
    return out


def plot_sweep(records: Sequence[Record], out: str | Path, title: str = "") -> list[Path]:
    """Write the sweep's PNGs into ``out``; returns their paths (none without matplotlib)."""
    plt = _pyplot()
    if plt is None or not records:
        return []
    out = Path(out)
    paths = [
        _speedup(plt, records, out / "speedup.png", title),
        _utilization(plt, records, out / "utilization.png", title),
        _accuracy(plt, records, out / "accuracy.png", title),
    ]
    return [p for p in paths if p is not None]


def _speedup(plt: Any, records: Sequence[Record], path: Path, title: str) -> Path:
    fig, (ax, ax_e) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    counts = sorted({r["stages"] for r in records})
    top = max(counts)
    ax.plot([1, top], [1, top], ":", color="grey", label="ideal (= S)")
    fine = list(range(1, top + 1))
    for i, (policy, rows) in enumerate(_by_policy(records).items()):
        color = f"C{i}"
        xs = [r["stages"] for r in rows]
        ax.plot(xs, [r["measured_speedup"] for r in rows], "-o", color=color,
                label=f"{policy}: measured")  # fmt: skip
        ax.plot(xs, [r["predicted_speedup"] for r in rows], "s", mfc="none", ms=9,
                color=color, label=f"{policy}: predicted (cost model)")  # fmt: skip
        r0 = rows[0]
        try:
            closed = [
                closed_form_speedup(policy, s, r0["microbatches"], r0["minibatches_per_epoch"])
                for s in fine
            ]
        except ValueError:  # a policy without a closed form
            closed = []
        if closed:
            ax.plot(fine, closed, "--", color=color, lw=1, alpha=0.6,
                    label=f"{policy}: closed form")  # fmt: skip
        ax_e.plot(xs, [r["efficiency"] for r in rows], "-o", color=color, label=policy)
    ax.set(xlabel="stages S", ylabel="speedup vs wop at S = 1", title="speedup")
    ax_e.axhline(1.0, color="grey", ls=":", lw=1)
    ax_e.set(
        xlabel="stages S",
        ylabel="predicted / measured makespan",
        title="runtime efficiency",
        ylim=(min(0.5, *(r["efficiency"] for r in records)) - 0.02, 1.05),
    )
    for a in (ax, ax_e):
        a.set_xticks(counts)
        a.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax_e.legend(fontsize=8)
    _title(fig, records, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _utilization(plt: Any, records: Sequence[Record], path: Path, title: str) -> Path:
    groups = _by_policy(records)
    fig, axes = plt.subplots(
        1, len(groups), figsize=(4.2 * len(groups), 3.8), squeeze=False, constrained_layout=True
    )
    for ax, (policy, rows) in zip(axes[0], groups.items(), strict=True):
        x = 0.0
        ticks, labels = [], []
        for r in rows:
            measured = r["measured_utilization_per_stage"]
            predicted = r["predicted_utilization_per_stage"]
            xs = [x + i for i in range(len(measured))]
            ax.bar(xs, measured, width=0.8, color="C0", label="measured" if x == 0 else None)
            ax.plot(xs, predicted, "_", ms=14, mew=2.5, color="C3",
                    label="predicted" if x == 0 else None)  # fmt: skip
            ticks.append(x + (len(measured) - 1) / 2)
            labels.append(f"S={r['stages']}")
            x += len(measured) + 1
        ax.set_xticks(ticks, labels)
        ax.set(title=policy, ylim=(0, 1.05), ylabel="utilization per stage")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8, loc="lower right")
    _title(fig, records, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _accuracy(plt: Any, records: Sequence[Record], path: Path, title: str) -> Path | None:
    if all(r["history"][-1].get("test_accuracy") is None for r in records if r["history"]):
        return None  # a regression task: no accuracy to plot
    fig, (ax_e, ax_c) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    counts = sorted({r["stages"] for r in records})
    dashes = ["-", "--", "-.", ":"]
    for i, (policy, rows) in enumerate(_by_policy(records).items()):
        for r in rows:
            h = [row for row in r["history"] if row.get("test_accuracy") is not None]
            style = {
                "color": f"C{i}",
                "ls": dashes[counts.index(r["stages"]) % len(dashes)],
                "label": f"{policy}, S={r['stages']}",
            }
            acc = [100 * row["test_accuracy"] for row in h]
            ax_e.plot([row["epoch"] for row in h], acc, **style)
            ax_c.plot([row["cycles"] for row in h], acc, **style)
    ax_e.set(xlabel="epoch", ylabel="test accuracy (%)", title="per epoch (equal samples)")
    ax_c.set(xlabel="cost-model cycles", ylabel="test accuracy (%)", title="per hardware cycle")
    for ax in (ax_e, ax_c):
        ax.grid(alpha=0.3)
    ax_c.legend(fontsize=7, ncol=2)
    _title(fig, records, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _title(fig: Any, records: Sequence[Record], title: str) -> None:
    r = records[0]
    fig.suptitle(
        (f"{title}: " if title else "")
        + f"{r['backend']} backend, Bm = {r['microbatches']} × {r['microbatch_size']}, "
        f"{r['epochs']} epochs"
    )
