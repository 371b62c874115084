"""The files of a run directory (docs/design.md §6).

A :class:`RunDirectory` writes them as a pipeline's ``fit`` goes: ``partition.json``,
``config.yaml`` and ``history.jsonl`` at the start, a line of history per epoch and
``checkpoint.pt`` when due; at the end (:meth:`RunDirectory.finish`, :func:`write_results`)
the rest, ``metrics.json`` last of all, so a directory without it is a run that did not
finish (its ``checkpoint.pt`` can be resumed). ``trace.json`` shows the first epoch's actions
in real microseconds; ``curves.png`` plots loss and accuracy per epoch when matplotlib is
installed.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aimcpipe.errors import ConfigError
from aimcpipe.runtime.checkpoint import CHECKPOINT_NAME, save_checkpoint
from aimcpipe.runtime.metrics import RunMetrics
from aimcpipe.scheduler.trace import track_events

if TYPE_CHECKING:
    from aimcpipe.runtime.epoch_runner import EpochRunner

__all__ = ["RunDirectory", "plot_curves", "runtime_trace", "write_json", "write_results"]

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


class RunDirectory:
    """The run directory ``path`` of one ``fit``: a new run needs it empty (or absent); a
    resumed run (``epoch`` > 0) writes into the one its checkpoint came from."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def check_fresh(self, epoch: int) -> None:
        if epoch == 0 and self.path.is_dir() and any(self.path.iterdir()):
            raise ConfigError(
                f"out: {self.path} is not empty; give a new directory (or load_checkpoint it "
                "to continue that run)"
            )

    def start(
        self,
        epoch: int,
        partition: dict[str, Any],
        settings: dict[str, Any] | None,
        history: Sequence[dict[str, Any]],
    ) -> None:
        """``partition.json``, ``config.yaml`` (if ``settings``), and ``history.jsonl`` as far
        as ``history`` goes; any ``metrics.json`` of an earlier attempt is removed."""
        self.check_fresh(epoch)
        self.path.mkdir(parents=True, exist_ok=True)
        # until this run finishes, the directory must not look complete
        (self.path / "metrics.json").unlink(missing_ok=True)
        (self.path / "partition.json").write_text(json.dumps(partition, indent=2) + "\n")
        if settings is not None:
            import yaml

            (self.path / "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
        # the history of a resumed run is what its checkpoint saw, not what came after
        lines = [json.dumps(h) for h in history]
        (self.path / "history.jsonl").write_text("".join(line + "\n" for line in lines))

    def append_history(self, entry: dict[str, Any]) -> None:
        with (self.path / "history.jsonl").open("a") as fh:
            fh.write(json.dumps(entry) + "\n")

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_NAME

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        save_checkpoint(self.checkpoint, state)

    def finish(
        self, metrics: RunMetrics, model_state: dict[str, Any], epochs: EpochRunner, head: str
    ) -> None:
        """The results (:func:`write_results`), with the trace ``epochs`` kept, labelled
        ``head`` and the epoch it shows."""
        write_results(
            self.path,
            metrics=metrics,
            model_state=model_state,
            trace=epochs.trace,
            label=f"{head} (epoch {epochs.trace_epoch + 1})",
            clocks=epochs.trace_clocks,
        )

    def kept_checkpoint(self) -> str:
        """For an error that ends the run: where its last checkpoint is, if one was written."""
        if self.checkpoint.is_file():
            return f"; {self.checkpoint} holds the last checkpoint"
        return ""
