"""aimcpipe.runtime: executing stages' action lists, transports and data streaming."""

from aimcpipe.runtime.datasets import DATASETS, Dataset, epoch_order, load_dataset

__all__ = ["DATASETS", "Dataset", "epoch_order", "load_dataset"]
