"""The files of a run directory (docs/design.md §6) written at the end of training.

``config.yaml`` and ``history.jsonl`` are written as the run goes (by the pipeline);
this module writes the rest: ``metrics.json`` last of all, so a directory without it is a run
that did not finish (its ``checkpoint.pt`` can be resumed). ``trace.json`` shows the first
epoch's actions in real microseconds; ``curves.png`` plots loss and accuracy per epoch when
matplotlib is installed.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from aimcpipe.runtime.metrics import RunMetrics
from aimcpipe.scheduler.trace import track_events

__all__ = ["plot_curves", "runtime_trace", "write_json", "write_results"]

log = logging.getLogger(__name__)


def _clean(value: Any) -> Any:
    """JSON has no NaN: write null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_clean(data), indent=2) + "\n")
    os.replace(tmp, path)


def runtime_trace(
    records: Sequence[Sequence[Any]], label: str, clocks: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Chrome trace of executed actions (``ActionRecord`` lists per stage), in µs, on the
    scheduler's clock; ``clocks`` says how each stage's clock was mapped onto it."""
    events = track_events(
        0,
        label,
        [[r.action for r in stage] for stage in records],
        [[r.start * 1e6 for r in stage] for stage in records],
        [[r.end * 1e6 for r in stage] for stage in records],
    )
    return {
        "traceEvents": events,
        "otherData": {
            "generator": "aimcpipe.runtime",
            "time_unit": "microseconds",
            **({"clocks": clocks} if clocks else {}),
        },
    }


def plot_curves(history: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Loss and accuracy per epoch; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no curves.png (pip install matplotlib)")
        return None
    epochs = [h["epoch"] for h in history]
    has_acc = any(h.get("test_accuracy") is not None for h in history)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5, 3.6))
    ax = axes[0] if has_acc else axes
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o", ms=3, label="train")
    if any(h.get("test_loss") is not None for h in history):
        ax.plot(epochs, [h["test_loss"] for h in history], marker="o", ms=3, label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    if has_acc:
        ax = axes[1]
        if any(h.get("train_accuracy") is not None for h in history):
            ax.plot(
                epochs,
                [100 * h["train_accuracy"] for h in history],
                marker="o",
                ms=3,
                label="train",
            )
        ax.plot(epochs, [100 * h["test_accuracy"] for h in history], marker="o", ms=3, label="test")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy (%)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(
    out: Path,
    *,
    metrics: RunMetrics,
    model_state: dict[str, Any],
    trace: Sequence[Sequence[Any]] | None,
    label: str,
    clocks: dict[str, Any] | None = None,
) -> None:
    """model.pt, trace.json, curves.png, then metrics.json (the completion mark)."""
    torch.save(model_state, out / "model.pt")
    if trace is not None:
        with (out / "trace.json").open("w") as fh:
            json.dump(runtime_trace(trace, label, clocks), fh, separators=(",", ":"))
    title = f"{metrics.policy}, {metrics.stages} stage(s), Bm={metrics.microbatches}"
    plot_curves(metrics.history, out / "curves.png", title)
    write_json(out / "metrics.json", metrics.to_dict())
