"""aimcpipe.runtime: ``Pipeline`` (the central scheduler and Python API), the backends that
run its stages (local, torch, ray), the one interpreter, transports, data, checkpoints."""

from aimcpipe.runtime.datasets import DATASETS, Dataset, epoch_order, load_dataset
from aimcpipe.runtime.lr import LRSchedule
from aimcpipe.runtime.metrics import EpochResult, RunMetrics
from aimcpipe.runtime.options import DeviceTime, RayOptions, RuntimeOptions
from aimcpipe.runtime.pipeline import LOSSES, Pipeline

__all__ = [
    "DATASETS",
    "LOSSES",
    "Dataset",
    "DeviceTime",
    "EpochResult",
    "LRSchedule",
    "Pipeline",
    "RayOptions",
    "RunMetrics",
    "RuntimeOptions",
    "epoch_order",
    "load_dataset",
]
