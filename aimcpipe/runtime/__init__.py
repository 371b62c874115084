"""aimcpipe.runtime: the interpreter that executes stages' action lists, transports, data,
checkpoints, and ``Pipeline`` (the central scheduler and Python API)."""

from aimcpipe.runtime.datasets import DATASETS, Dataset, epoch_order, load_dataset
from aimcpipe.runtime.lr import LRSchedule
from aimcpipe.runtime.metrics import EpochResult, RunMetrics
from aimcpipe.runtime.pipeline import LOSSES, Pipeline

__all__ = [
    "DATASETS",
    "LOSSES",
    "Dataset",
    "EpochResult",
    "LRSchedule",
    "Pipeline",
    "RunMetrics",
    "epoch_order",
    "load_dataset",
]
