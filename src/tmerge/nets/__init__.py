"""Networks and the split of their parameters into fused and task-specific sets."""

from __future__ import annotations

from typing import Any

from tmerge.nets.isensee2017 import Isensee2017, init_weights
from tmerge.nets.partition import (
    Partition,
    head_names,
    input_names,
    layer_groups,
    parameter_owners,
    partition,
)

#: MONAI's networks with their P/S split declared (:mod:`tmerge.nets.monai_nets`), imported on
#: first use: importing MONAI takes seconds.
_MONAI_NETS = ("DynUNet", "SegResNet", "UNet")

__all__ = [
    "input_names",
    "DynUNet",
    "Isensee2017",
    "Partition",
    "SegResNet",
    "UNet",
    "head_names",
    "init_weights",
    "layer_groups",
    "parameter_owners",
    "partition",
]


def __getattr__(name: str) -> Any:
    if name in _MONAI_NETS:
        from tmerge.nets import monai_nets

        return getattr(monai_nets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
