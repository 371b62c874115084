"""Speedup and utilization vs stage count, one line per policy (cf. arXiv 2410.15155).

matplotlib (a dependency of the core install) is imported only when a plot is
drawn, and if it is missing the plot is skipped with a logged warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_speedup"]

log = logging.getLogger(__name__)


def plot_speedup(
    rows: Sequence[Mapping[str, Any]], path: str | Path, title: str | None = None
) -> Path | None:
    """Write a PNG of ``speedup_vs_wop`` and mean ``utilization`` against ``stages`` for
    each policy in ``rows`` (``simulate --json`` rows). Returns the path, or None when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; skipping %s (pip install matplotlib)", path)
        return None
    path = Path(path)
    by_policy: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_policy.setdefault(str(row["policy"]), []).append(row)
    stage_counts = sorted({int(r["stages"]) for r in rows})

    fig, (ax_s, ax_u) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    ax_s.plot(stage_counts, stage_counts, ":", color="grey", label="linear (= S)")
    # distinct markers and dashes: policies with equal timings (sync-1f1b and gpipe at U=0)
    # would otherwise hide each other
    markers = "os^Dvx*"
    dashes = ["-", "--", "-.", ":"]
    for i, (policy, prs) in enumerate(by_policy.items()):
        prs = sorted(prs, key=lambda r: r["stages"])
        xs = [r["stages"] for r in prs]
        style = {
            "marker": markers[i % len(markers)],
            "linestyle": dashes[i % len(dashes)],
            "markersize": 8 - i % 4,
            "label": policy,
        }
        ax_s.plot(xs, [r["speedup_vs_wop"] for r in prs], **style)
        ax_u.plot(xs, [r["utilization"] for r in prs], **style)
    ax_s.set(xlabel="stages S", ylabel="speedup vs wop (cycles)", title="speedup")
    ax_u.set(xlabel="stages S", ylabel="mean utilization", title="utilization", ylim=(0, 1.05))
    for ax in (ax_s, ax_u):
        ax.set_xticks(stage_counts)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
