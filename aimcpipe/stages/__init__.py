"""aimcpipe.stages"""

from aimcpipe.stages.blocks import pipeline_blocks
from aimcpipe.stages.partition import PARTITIONERS, Partition, partition, register_partitioner

__all__ = ["PARTITIONERS", "Partition", "partition", "pipeline_blocks", "register_partitioner"]
