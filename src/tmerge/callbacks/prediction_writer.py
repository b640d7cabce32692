"""Writes the label maps a :class:`~tmerge.modules.segmentation.SegmentationModule` predicts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from tmerge.evaluate import Prediction, save_prediction


class PredictionWriter(BasePredictionWriter):
    """Each predicted volume's label map as ``<subject>.nii.gz`` in its original geometry: those
    of the test subjects (the outputs of every test batch) into ``test_dir``, those of
    ``trainer.predict`` (the unlabelled set) into ``predict_dir``. Each file is written
    atomically by the rank that predicted it, so the folders must be shared between nodes, as
    the checkpoints are. No ``state_dict``: what it wrote is on disk.

    Args:
        test_dir: Folder for the test subjects' maps (None: not written).
        predict_dir: Folder for ``predict``'s maps (None: not written).
    """

    def __init__(self, test_dir: Path | None = None, predict_dir: Path | None = None) -> None:
        super().__init__(write_interval="batch")
        self.test_dir, self.predict_dir = test_dir, predict_dir

    @staticmethod
    def _write(folder: Path | None, predictions: Sequence[Prediction] | None) -> None:
        if folder is None or not predictions:
            return
        for p in predictions:
            save_prediction(folder, p.subject, p.labels, p.meta)

    @override
    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        self._write(self.predict_dir, prediction)

    @override
    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._write(self.test_dir, outputs)
