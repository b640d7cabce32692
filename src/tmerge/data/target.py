"""Target data (paper task 3, and any labelled dataset): the target stages train and test on it.

A target is a dataset, chosen by ``data.root`` (``None``: the embedded BraTS-like default). Its
layout is detected (:func:`tmerge.data.formats.open_target`; ``data.layout`` names it where
detection needs help):

* **BraTS** — BraTS 2018 (the paper's, which the embedded default copies; ``.nii`` too)::

      <root>/MICCAI_BraTS_2018_Data_Training/{HGG,LGG}/Brats18_<ID>/Brats18_<ID>_{t1,t1ce,t2,flair,seg}.nii.gz
      <root>/MICCAI_BraTS_2018_Data_Validation/Brats18_<ID>/Brats18_<ID>_{t1,t1ce,t2,flair}.nii.gz

  BraTS 2021 (``BraTS2021_<ID>/…``), BraTS 2023 GLI (``BraTS-GLI-<ID>-<TP>/…-{t1n,t1c,t2w,t2f,seg}``,
  3 = enhancing), or nnU-Net v2 raw whose ``dataset.json`` names the four tumour channels and
  tumour labels. Four channels in, the nested regions ET ⊂ TC ⊂ WT out (sigmoid), labels mapped
  to BraTS 2018's 0/1/2/4 and written back in the dataset's own values.
* **Any other nnU-Net v2 raw dataset** (``dataset.json``, ``imagesTr``, ``labelsTr``,
  ``imagesTs``): its own channels (any count, any names) and labels — plain labels are softmax
  classes, regions (lists of values, with ``regions_class_order``) sigmoid regions
  (``data.output_mode`` may insist on one; a mismatch is an error). Assumed: one label map per
  case, background 0.

The unlabelled set (BraTS 2018: the validation folder; 2021/2023: case folders without ``seg``;
nnU-Net: ``imagesTs``) is optional; it is the prediction set of the 100 % portion.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tmerge.data.channels import TASK_CHANNELS
from tmerge.data.datamodule import DataConfig, SegmentationDataModule
from tmerge.data.formats import (
    BRATS2018_GRADES,
    BRATS2018_TRAINING,
    BRATS2018_VALIDATION,
    TARGET_OUTPUT_MODES,
    open_target,
)
from tmerge.data.labels import LabelMapping
from tmerge.data.layout import GENERIC, Discovery
from tmerge.data.preprocess import PreprocessSettings
from tmerge.data.schemes import BRATS_SCHEME, LabelScheme
from tmerge.data.splits import brats_splits
from tmerge.errors import ConfigError, DataError

#: Modality suffixes (BraTS 2018/2021 names), in input-channel order.
BRATS_MODALITIES: tuple[str, ...] = TASK_CHANNELS["brats"]
TRAINING_DIR = BRATS2018_TRAINING
VALIDATION_DIR = BRATS2018_VALIDATION
GRADES = BRATS2018_GRADES
#: The run-folder name of BraTS targets (``runs/brats/p<portion>/…``).
BRATS_TARGET = "brats"


@dataclass
class TargetDataConfig(DataConfig):
    """Config of :class:`TargetDataModule` (shared fields: see :class:`~tmerge.data.datamodule.DataConfig`)."""

    # Percentage of the labelled pool to train on; 8 % is where the paper ran every baseline.
    portion: int = 8
    # The fixed test set, the same for every portion: the paper's 40 BraTS subjects. A smaller
    # dataset needs fewer (the error says what is possible).
    test_size: int = 40
    # The number the portion is a percentage of: 255 labelled subjects in the paper; null: every
    # labelled case left after the test set.
    pool_size: int | None = 255
    # The paper runs N4 bias-field correction on BraTS (§4.2).
    n4: bool = True
    # Which of the non-test subjects train and validate (the test set depends on `seed` only).
    # None: the run's seed, so that `seeds=[0,1,2]` repeats every initialisation over three
    # draws of train/val subjects, the same draw for every initialisation of a seed.
    draw_seed: int | None = None
    # The root's layout (brats2018, brats2021, brats2023, nnunet); null: detected.
    layout: str | None = None
    # "auto": regions → sigmoid, plain labels → softmax (an nnU-Net dataset of BraTS' channels
    # and tumour labels is BraTS); "softmax" or "sigmoid" insist, and a mismatch is an error.
    output_mode: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.portion <= 100:
            raise ConfigError(f"portion: got {self.portion}; expected a percentage between 1 and 100")
        if self.test_size < 1 or (self.pool_size is not None and self.pool_size < 1):
            raise ConfigError(
                f"test_size/pool_size: got {self.test_size}/{self.pool_size}; expected positive integers "
                "(pool_size may be null: every case left after the test set)"
            )
        if self.output_mode not in TARGET_OUTPUT_MODES:
            raise ConfigError(
                f"data.output_mode: expected one of {', '.join(TARGET_OUTPUT_MODES)}, got {self.output_mode!r}"
            )


class TargetDataModule(SegmentationDataModule):
    """The target task's DataModule: BraTS in any of its layouts, or any nnU-Net v2 raw dataset.

    Args:
        run_dir: Folder where ``setup`` writes the split record (:data:`tmerge.runs.SPLITS_FILE`;
            None: not written).
        **fields: :class:`TargetDataConfig` fields.

    The dataset's description is read on construction (folder listings and ``dataset.json``;
    the network's shape depends on it); a root that is not there is taken for BraTS, as the
    embedded default, and named by :meth:`check_layout`.

    Attributes:
        scheme: The :class:`~tmerge.data.schemes.LabelScheme` (BraTS: the regions ET, TC, WT).
        modalities: The input channels' names (BraTS: t1, t1ce, t2, flair).
        in_channels: Their count.
        n_outputs: Network outputs (BraTS: 3 sigmoid channels; plain classes: K + 1).
        output_mode: ``"sigmoid"`` or ``"softmax"``.
        class_names: The scored classes / regions (``["ET", "TC", "WT"]``).
        name: The target's name, its run folder (``runs/<name>/p<portion>/…``): ``brats`` for
            BraTS, else the dataset folder's name.

    Batches: training ``{"image": (B, C, P, P, P) float32, "label": (B, L, P, P, P) float32}``
    (``L`` = 1 class indices or one mask per region); validation/test whole volumes and, for
    ``portion=100``, ``predict_dataloader`` over the unlabelled set (see
    :mod:`tmerge.data.datasets`).
    """

    kind = "brats"
    modalities = BRATS_MODALITIES
    config_class = TargetDataConfig
    label_dtype = torch.float32

    def __init__(self, run_dir: str | None = None, described: dict[str, Any] | None = None, **fields: Any) -> None:
        super().__init__(run_dir=run_dir, **fields)
        c = self.config
        scheme, name = BRATS_SCHEME, BRATS_TARGET
        self._recorded_labels: LabelMapping | None = None
        if described is not None and not (c.root is not None and self.root.is_dir()):
            # A finished run's target (tmerge.runs.TARGET_FILE), its dataset root not here.
            self.kind = described["kind"]
            self.modalities = tuple(described["channels"])
            scheme, name = LabelScheme.from_meta(described["scheme"]), described["name"]
            if described.get("labels"):
                self._recorded_labels = LabelMapping.from_meta(described["labels"])
        elif c.root is not None and self.root.is_dir():
            layout = open_target(self.root, c.layout, c.output_mode)
            self._layout = layout
            self.kind = layout.task  # "brats" or "target"
            self.modalities = layout.input_channels
            scheme = layout.scheme or BRATS_SCHEME
            if layout.task == GENERIC:
                name = target_name(self.root.name)
        elif c.output_mode == "softmax" or c.layout == "nnunet":
            # Only a dataset that is there can say what it holds.
            raise DataError(f"{self.root}: dataset folder not found; expected {self.layout_hint()}")
        self.scheme: LabelScheme = scheme
        self.name = name
        self.in_channels = len(self.modalities)
        self.class_names = list(scheme.classes)
        self.n_outputs = scheme.n_outputs
        self.output_mode = scheme.mode
        # Class indices for softmax (as the parcellation sources), region masks for sigmoid.
        self.label_dtype = torch.int64 if scheme.mode == "softmax" else torch.float32

    def recorded(self) -> dict[str, Any]:
        """What a run records of its target (:data:`tmerge.runs.TARGET_FILE`), so that its
        network can predict where the dataset root is not (``described=`` reads it back)."""
        mapping = self.preprocess_settings().labels
        return {
            "name": self.name,
            "kind": self.kind,
            "channels": list(self.modalities),
            "scheme": self.scheme.as_meta(),
            "labels": None if mapping is None else mapping.as_meta(),
        }

    def preprocess_settings(self) -> PreprocessSettings:
        """As the base's; a recorded target's label mapping where its root is not here."""
        settings = super().preprocess_settings()
        if settings.labels is None and self._recorded_labels is not None:
            return dataclasses.replace(settings, labels=self._recorded_labels)
        return settings

    def describe(self) -> dict[str, Any]:
        """What the target is, for ``--show-config`` and the export: name, layout, channels,
        output mode, classes and the dataset's label values."""
        if self._layout is not None:
            layout = self._layout.format.name
        elif self.config.root is None:
            layout = "brats2018 (embedded default)"
        else:
            layout = "not found (taken for BraTS)"
        mapping = self.preprocess_settings().labels
        return {
            "name": self.name,
            "root": str(self.root),
            "layout": layout,
            "channels": list(self.modalities),
            "output_mode": self.output_mode,
            "classes": self.scheme.describe(),
            "label_values": list(mapping.values) if mapping is not None else [0, 1, 2, 4],
        }

    def make_splits(self, discovery: Discovery, source: str) -> tuple[dict[str, Any], dict[str, list[str]]]:
        c = self.config
        splits = brats_splits(
            list(discovery.labelled),
            c.portion,
            seed=c.seed,
            test_size=c.test_size,
            pool_size=c.pool_size,
            unlabelled=list(discovery.unlabelled),
            source=source,
            draw_seed=c.draw_seed,
        )
        return splits, {part: splits[part] for part in ("train", "val", "test", "predict")}

    def to_target(self, label: np.ndarray) -> np.ndarray:
        """Internal labels ``(D, H, W)`` → the training target ``(L, D, H, W)`` uint8: the region
        masks (BraTS: ET, TC, WT) or the class indices (``L = 1``)."""
        return self.scheme.to_target(label)

    def _split_record(self) -> dict[str, Any]:
        return {**super()._split_record(), "portion": self.config.portion}


def target_name(folder: str) -> str:
    """A dataset folder's name as a run-folder name (``Dataset042_Hippocampus`` as it is; other
    characters than letters, digits, ``-``, ``_`` and ``.`` become ``_``)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", folder).strip("._") or "target"
    return name if name != BRATS_TARGET else f"{name}_nnunet"
