"""BraTS 2018 data (paper task 3): four MR contrasts in, three nested tumour regions out.

Layout (the challenge release's, which the embedded default copies; ``.nii`` works too)::

    <root>/MICCAI_BraTS_2018_Data_Training/{HGG,LGG}/Brats18_<ID>/Brats18_<ID>_{t1,t1ce,t2,flair,seg}.nii.gz
    <root>/MICCAI_BraTS_2018_Data_Validation/Brats18_<ID>/Brats18_<ID>_{t1,t1ce,t2,flair}.nii.gz

The validation folder (unlabelled, the challenge's online set) is optional; it is the prediction
set of the 100 % portion.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tmerge.data.common import DataConfig, Discovery, SegmentationDataModule
from tmerge.data.labels import REGIONS, brats_regions
from tmerge.data.nifti import find_modality
from tmerge.data.splits import brats_splits
from tmerge.errors import ConfigError, DataError

#: Modality suffixes, in input-channel order.
BRATS_MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
TRAINING_DIR = "MICCAI_BraTS_2018_Data_Training"
VALIDATION_DIR = "MICCAI_BraTS_2018_Data_Validation"
GRADES = ("HGG", "LGG")


@dataclass
class BraTSDataConfig(DataConfig):
    """Config of :class:`BraTSDataModule` (shared fields: see :class:`~tmerge.data.common.DataConfig`)."""

    # Percentage of the labelled pool to train on; 8 % is where the paper ran every baseline.
    portion: int = 8
    # The paper's fixed 40-subject test set, the same for every portion.
    test_size: int = 40
    # The number the portion is a percentage of: 255 labelled subjects in the paper.
    pool_size: int = 255
    # The paper runs N4 bias-field correction on BraTS (§4.2).
    n4: bool = True
    # Which of the non-test subjects train and validate (the test set depends on `seed` only).
    # None: the run's seed, so that `seeds=[0,1,2]` repeats every initialisation over three
    # draws of train/val subjects, the same draw for every initialisation of a seed.
    draw_seed: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.portion <= 100:
            raise ConfigError(f"portion: got {self.portion}; expected a percentage between 1 and 100")
        if self.test_size < 1 or self.pool_size < 1:
            raise ConfigError(
                f"test_size/pool_size: got {self.test_size}/{self.pool_size}; expected positive integers"
            )


class BraTSDataModule(SegmentationDataModule):
    """BraTS 2018 DataModule.

    Args:
        run_dir: Folder where ``setup`` writes the split record (:data:`tmerge.runs.SPLITS_FILE`;
            None: not written).
        **fields: :class:`BraTSDataConfig` fields.

    Attributes:
        in_channels: 4 (t1, t1ce, t2, flair).
        n_outputs: 3 sigmoid channels.
        output_mode: ``"sigmoid"``.
        class_names: ``["ET", "TC", "WT"]``.

    Batches: training ``{"image": (B, 4, P, P, P) float32, "label": (B, 3, P, P, P) float32}``
    region masks (ET, TC, WT); validation/test whole volumes and, for ``portion=100``,
    ``predict_dataloader`` over the unlabelled validation set (see :mod:`tmerge.data.common`).
    Predictions go back to label maps with :func:`tmerge.data.labels.regions_to_brats` and
    :func:`tmerge.data.preprocess.uncrop`.
    """

    kind = "brats"
    modalities = BRATS_MODALITIES
    config_class = BraTSDataConfig
    label_dtype = torch.float32

    def __init__(self, run_dir: str | None = None, **fields: Any) -> None:
        super().__init__(run_dir=run_dir, **fields)
        self.class_names = list(REGIONS)
        self.n_outputs = len(REGIONS)
        self.output_mode = "sigmoid"

    def layout_hint(self) -> str:
        return f"<root>/{TRAINING_DIR}/{{HGG,LGG}}/Brats18_<ID>/Brats18_<ID>_t1.nii.gz (and _t1ce, _t2, _flair, _seg; .nii too)"

    def discover(self, root: Path) -> Discovery:
        def folders(parent: Path) -> dict[str, Path]:
            return {d.name: d for d in sorted(parent.iterdir()) if d.is_dir()} if parent.is_dir() else {}

        labelled: dict[str, Path] = {}
        for grade in GRADES:
            labelled.update(folders(root / TRAINING_DIR / grade))
        if not labelled:
            raise DataError(f"{root}: no BraTS training subjects found; expected {self.layout_hint()}")
        return Discovery(labelled=labelled, unlabelled=folders(root / VALIDATION_DIR))

    def subject_files(self, folder: Path, labelled: bool) -> tuple[dict[str, Path], Path | None]:
        files = {m: find_modality(folder, f"{folder.name}_{m}") for m in BRATS_MODALITIES}
        return files, find_modality(folder, f"{folder.name}_seg") if labelled else None

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
        """BraTS labels ``(D, H, W)`` → ``(3, D, H, W)`` uint8 region masks (ET, TC, WT)."""
        return brats_regions(label).astype(np.uint8)

    def _split_record(self) -> dict[str, Any]:
        return {**super()._split_record(), "portion": self.config.portion}
