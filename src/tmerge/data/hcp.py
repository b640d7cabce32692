"""HCP parcellation data (paper tasks 1 and 2): T1 + T2 in, the paper's 14 classes out.

Layout (the HCP release's, which the embedded default copies)::

    <root>/<subject>/T1w/T1w_acpc_dc_restore_brain.nii.gz
    <root>/<subject>/T1w/T2w_acpc_dc_restore_brain.nii.gz
    <root>/<subject>/T1w/aparc+aseg.nii.gz

(``.nii`` works too.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tmerge.data.common import DataConfig, Discovery, SegmentationDataModule
from tmerge.data.labels import class_names, resolve_labels, select_labels
from tmerge.data.nifti import find_modality
from tmerge.data.splits import hcp_splits
from tmerge.errors import ConfigError, DataError

#: Modality name -> file stem, in input-channel order.
HCP_FILES: dict[str, str] = {"T1": "T1w_acpc_dc_restore_brain", "T2": "T2w_acpc_dc_restore_brain"}
HCP_LABEL_FILE = "aparc+aseg"
HCP_SPLITS = ("task1", "task2", "all")
# Each task's label set in the paper; "all" (the All-HCP baseline) defaults to all 14 classes.
_DEFAULT_LABELS = {"task1": "1:7", "task2": "8:14", "all": "all"}


@dataclass
class HCPDataConfig(DataConfig):
    """Config of :class:`HCPDataModule` (shared fields: see :class:`~tmerge.data.common.DataConfig`)."""

    # Which subjects train: "task1"/"task2" (23 each, Table 1) or "all" (both, All-HCP baselines).
    split: str = "task1"
    # Label set: "1:7", "8:14", "all", another range "a:b" or a list "2,9,14" of paper classes.
    # None: the split's own set (task1 → 1:7, task2 → 8:14, all → all), so a task needs only
    # its split named and cannot silently train the other task's labels.
    labels: str | None = None
    # The paper corrects the bias field for BraTS only; HCP images are already corrected.
    n4: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.split not in HCP_SPLITS:
            raise ConfigError(f"split: got {self.split!r}; expected one of {list(HCP_SPLITS)}")
        resolve_labels(self.label_set)

    @property
    def label_set(self) -> str:
        """The label set in effect (the split's default when ``labels`` is None)."""
        return _DEFAULT_LABELS[self.split] if self.labels is None else self.labels


class HCPDataModule(SegmentationDataModule):
    """HCP parcellation DataModule.

    Args:
        run_dir: Folder where ``setup`` writes the split record (:data:`tmerge.runs.SPLITS_FILE`;
            None: not written).
        **fields: :class:`HCPDataConfig` fields.

    Attributes:
        in_channels: 2 (T1, T2).
        n_outputs: K + 1 softmax channels (background and the K selected classes).
        output_mode: ``"softmax"``.
        class_names: Names of the K selected paper classes.

    Batches: training ``{"image": (B, 2, P, P, P) float32, "label": (B, 1, P, P, P) int64}`` with
    class indices 0..K; validation/test whole volumes, see :mod:`tmerge.data.common`.

    Example:
        >>> dm = HCPDataModule(split="task2", root="/data/HCP")  # labels 8:14
        >>> dm.n_outputs
        8
    """

    kind = "hcp"
    modalities = tuple(HCP_FILES)
    config_class = HCPDataConfig
    label_dtype = torch.int64

    def __init__(self, run_dir: str | None = None, **fields: Any) -> None:
        super().__init__(run_dir=run_dir, **fields)
        self.labels = resolve_labels(self.config.label_set)
        self.class_names = class_names(self.labels)
        self.n_outputs = len(self.labels) + 1
        self.output_mode = "softmax"

    def layout_hint(self) -> str:
        return f"<root>/<subject>/T1w/{HCP_FILES['T1']}.nii.gz (and {HCP_FILES['T2']}, {HCP_LABEL_FILE}; .nii too)"

    def discover(self, root: Path) -> Discovery:
        subjects = {d.name: d / "T1w" for d in sorted(root.iterdir()) if (d / "T1w").is_dir()}
        if not subjects:
            raise DataError(f"{root}: no HCP subjects found; expected {self.layout_hint()}")
        return Discovery(labelled=subjects)

    def subject_files(self, folder: Path, labelled: bool) -> tuple[dict[str, Path], Path | None]:
        files = {name: find_modality(folder, stem) for name, stem in HCP_FILES.items()}
        return files, find_modality(folder, HCP_LABEL_FILE) if labelled else None

    def make_splits(self, discovery: Discovery, source: str) -> tuple[dict[str, Any], dict[str, list[str]]]:
        splits = hcp_splits(list(discovery.labelled), seed=self.config.seed, source=source)
        chosen = splits[self.config.split]
        return splits, {"train": chosen["train"], "val": chosen["val"], "test": splits["test"], "predict": []}

    def to_target(self, label: np.ndarray) -> np.ndarray:
        """Paper classes ``(D, H, W)`` → ``(1, D, H, W)`` uint8 indices 0..K of the selected set."""
        return select_labels(label, self.labels)[None]

    def _split_record(self) -> dict[str, Any]:
        return {**super()._split_record(), "split": self.config.split, "labels": list(self.labels)}
