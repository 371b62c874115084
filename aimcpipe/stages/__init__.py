"""aimcpipe.stages: the model zoo, partitioners and ``Stage`` (a run of blocks with its tiles,
stashes and weight version)."""

from aimcpipe.stages.blocks import pipeline_blocks
from aimcpipe.stages.partition import PARTITIONERS, Partition, partition, register_partitioner
from aimcpipe.stages.stage import Stage, StageCounters
from aimcpipe.stages.zoo import MODELS, build_model, resolve_factory

__all__ = [
    "MODELS",
    "PARTITIONERS",
    "Partition",
    "Stage",
    "StageCounters",
    "build_model",
    "partition",
    "pipeline_blocks",
    "register_partitioner",
    "resolve_factory",
]
