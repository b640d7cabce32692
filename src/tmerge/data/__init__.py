"""Data: NIfTI reading, label mapping, cached preprocessing, seeded splits and the DataModules.

``HCPDataModule`` (paper tasks 1 and 2) and ``TargetDataModule`` (task 3) read the datasets in
their native layouts; with ``root=None`` they generate and use the embedded default data.

The DataModules are exported lazily (PEP 562), so importing a light submodule such as
``tmerge.data.labels`` does not pull in Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "TargetDataConfig": "tmerge.data.target",
    "TargetDataModule": "tmerge.data.target",
    "DataConfig": "tmerge.data.datamodule",
    "SegmentationDataModule": "tmerge.data.datamodule",
    "data_dir": "tmerge.paths",
    "HCPDataConfig": "tmerge.data.hcp",
    "HCPDataModule": "tmerge.data.hcp",
}

__all__ = [
    "TargetDataConfig",
    "TargetDataModule",
    "DataConfig",
    "HCPDataConfig",
    "HCPDataModule",
    "SegmentationDataModule",
    "data_dir",
]

if TYPE_CHECKING:
    from tmerge.data.datamodule import DataConfig, SegmentationDataModule
    from tmerge.data.hcp import HCPDataConfig, HCPDataModule
    from tmerge.data.target import TargetDataConfig, TargetDataModule
    from tmerge.paths import data_dir


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tmerge.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
