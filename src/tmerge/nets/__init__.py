"""Networks and the split of their parameters into fused and task-specific sets."""

from tmerge.nets.isensee2017 import Isensee2017, init_weights
from tmerge.nets.partition import Partition, head_names, layer_groups, parameter_owners, partition

__all__ = [
    "Isensee2017",
    "Partition",
    "head_names",
    "init_weights",
    "layer_groups",
    "parameter_owners",
    "partition",
]
