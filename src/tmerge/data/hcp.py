"""Parcellation source data (paper tasks 1 and 2): T1 + T2 in, parcellation classes out.

The root's layout is detected (:mod:`tmerge.data.formats`): HCP (the release's, which the
embedded default copies; ``.nii`` works too; FreeSurfer aseg → the paper's 14 classes)::

    <root>/<subject>/T1w/T1w_acpc_dc_restore_brain.nii.gz
    <root>/<subject>/T1w/T2w_acpc_dc_restore_brain.nii.gz
    <root>/<subject>/T1w/aparc+aseg.nii.gz

or nnU-Net v2 raw (``dataset.json`` with channels named T1 and T2, ``imagesTr``, ``labelsTr``),
whose ``labels`` are the classes: ``labels`` selects among their values (``"1:7"`` = values 1..7)
and the class names are dataset.json's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tmerge.data.datamodule import DataConfig, SegmentationDataModule
from tmerge.data.formats import HCP_FILES, HCP_LABEL_FILE
from tmerge.data.labels import check_label_spec, class_names, resolve_labels, select_labels
from tmerge.data.layout import Discovery
from tmerge.data.nnunet import NNUNET_FILE
from tmerge.data.splits import hcp_splits
from tmerge.errors import ConfigError

__all__ = ["HCP_FILES", "HCP_LABEL_FILE", "HCPDataConfig", "HCPDataModule"]
HCP_SPLITS = ("task1", "task2", "all")
# Each task's label set in the paper; "all" (the All-HCP baseline) defaults to all 14 classes.
_DEFAULT_LABELS = {"task1": "1:7", "task2": "8:14", "all": "all"}


@dataclass
class HCPDataConfig(DataConfig):
    """Config of :class:`HCPDataModule` (shared fields: see :class:`~tmerge.data.datamodule.DataConfig`)."""

    # Which subjects train: "task1"/"task2" (23 each, Table 1) or "all" (both, All-HCP baselines).
    split: str = "task1"
    # Label set: "1:7", "8:14", "all", another range "a:b" or a list "2,9,14" of paper classes
    # (of an nnU-Net root: of its dataset.json label values).
    # None: the split's own set (task1 → 1:7, task2 → 8:14, all → all), so a task needs only
    # its split named and cannot silently train the other task's labels.
    labels: str | None = None
    # The paper corrects the bias field for BraTS only; HCP images are already corrected.
    n4: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.split not in HCP_SPLITS:
            raise ConfigError(f"split: got {self.split!r}; expected one of {list(HCP_SPLITS)}")
        check_label_spec(self.label_set)  # the classes it may name are the dataset's

    @property
    def label_set(self) -> str:
        """The label set in effect (the split's default when ``labels`` is None)."""
        return _DEFAULT_LABELS[self.split] if self.labels is None else self.labels


class HCPDataModule(SegmentationDataModule):
    """Parcellation DataModule (the root's format: HCP or nnU-Net v2 raw).

    Args:
        run_dir: Folder where ``setup`` writes the split record (:data:`tmerge.runs.SPLITS_FILE`;
            None: not written).
        **fields: :class:`HCPDataConfig` fields.

    Attributes:
        in_channels: 2 (T1, T2).
        n_outputs: K + 1 softmax channels (background and the K selected classes).
        output_mode: ``"softmax"``.
        class_names: Names of the K selected classes (paper classes; nnU-Net: dataset.json's).
        label_values: The dataset's foreground class values (HCP: the paper's 1..14).

    Batches: training ``{"image": (B, 2, P, P, P) float32, "label": (B, 1, P, P, P) int64}`` with
    class indices 0..K; validation/test whole volumes, see :mod:`tmerge.data.datasets`.

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
        # The classes are the dataset's: an nnU-Net root's dataset.json is read now (a small
        # file; the network's outputs depend on it), any other root is HCP's paper classes.
        names = None
        if self.config.root is not None and (self.root / NNUNET_FILE).is_file():
            names = self.layout.classes
        self.label_values = None if names is None else list(names)
        self.labels = resolve_labels(self.config.label_set, self.label_values)
        self.class_names = class_names(self.labels, names)
        self.n_outputs = len(self.labels) + 1
        self.output_mode = "softmax"

    def make_splits(self, discovery: Discovery, source: str) -> tuple[dict[str, Any], dict[str, list[str]]]:
        splits = hcp_splits(list(discovery.labelled), seed=self.config.seed, source=source)
        chosen = splits[self.config.split]
        return splits, {"train": chosen["train"], "val": chosen["val"], "test": splits["test"], "predict": []}

    def to_target(self, label: np.ndarray) -> np.ndarray:
        """Class values ``(D, H, W)`` → ``(1, D, H, W)`` uint8 indices 0..K of the selected set."""
        return select_labels(label, self.labels, self.label_values)[None]

    def subject_meta(self, meta: dict[str, Any]) -> dict[str, Any]:
        """A resampled subject's meta also names the selected classes, so that its true labels
        can be read in its own geometry (:func:`tmerge.data.preprocess.original_labels`)."""
        return {**meta, "classes": list(self.labels)} if "grid_affine" in meta else meta

    def _split_record(self) -> dict[str, Any]:
        return {**super()._split_record(), "split": self.config.split, "labels": list(self.labels)}
