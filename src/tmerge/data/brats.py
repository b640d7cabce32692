"""BraTS data (paper task 3): four MR contrasts in, three nested tumour regions out.

The root's layout is detected (:mod:`tmerge.data.formats`): BraTS 2018 (the paper's, which the
embedded default copies; ``.nii`` works too)::

    <root>/MICCAI_BraTS_2018_Data_Training/{HGG,LGG}/Brats18_<ID>/Brats18_<ID>_{t1,t1ce,t2,flair,seg}.nii.gz
    <root>/MICCAI_BraTS_2018_Data_Validation/Brats18_<ID>/Brats18_<ID>_{t1,t1ce,t2,flair}.nii.gz

BraTS 2021 (``BraTS2021_<ID>/BraTS2021_<ID>_{t1,t1ce,t2,flair,seg}``), BraTS 2023 GLI
(``BraTS-GLI-<ID>-<TP>/BraTS-GLI-<ID>-<TP>-{t1n,t1c,t2w,t2f,seg}``, 3 = enhancing) or nnU-Net v2
raw (``dataset.json``, ``imagesTr``, ``labelsTr``, ``imagesTs``). Each format's labels are mapped
to BraTS 2018's 0/1/2/4 (the regions ET, TC, WT) and predictions are written back in its own.

The unlabelled set (2018: the validation folder; 2021/2023: case folders without ``seg``;
nnU-Net: ``imagesTs``) is optional; it is the prediction set of the 100 % portion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tmerge.data.common import DataConfig, Discovery, SegmentationDataModule
from tmerge.data.formats import BRATS2018_GRADES, BRATS2018_TRAINING, BRATS2018_VALIDATION, TASK_CHANNELS
from tmerge.data.labels import REGIONS, brats_regions
from tmerge.data.splits import brats_splits
from tmerge.errors import ConfigError

#: Modality suffixes (BraTS 2018/2021 names), in input-channel order.
BRATS_MODALITIES: tuple[str, ...] = TASK_CHANNELS["brats"]
TRAINING_DIR = BRATS2018_TRAINING
VALIDATION_DIR = BRATS2018_VALIDATION
GRADES = BRATS2018_GRADES


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
    """BraTS DataModule (the root's format: BraTS 2018, 2021, 2023 or nnU-Net v2 raw).

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
        """Internal (BraTS 2018) labels ``(D, H, W)`` → ``(3, D, H, W)`` uint8 region masks (ET, TC, WT)."""
        return brats_regions(label).astype(np.uint8)

    def _split_record(self) -> dict[str, Any]:
        return {**super()._split_record(), "portion": self.config.portion}
