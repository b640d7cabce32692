"""Remembers the validation metrics of the best epoch, and the training time, across resumes."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from typing_extensions import override


class BestMetrics(Callback):
    """Keeps the validation metrics of the epoch that the checkpoint callback considers best, so
    stages can report per-class scores of the best model without another validation pass.

    Its state (those metrics and the training time of earlier attempts) travels in the
    checkpoint, so a resumed run reports the same as an uninterrupted one.

    Args:
        checkpoint: the fit's ``ModelCheckpoint``; its ``monitor`` and ``mode`` decide "best".
        prefix: only ``trainer.callback_metrics`` whose names start with it are kept.

    Attributes:
        metrics: metric name → value of the best epoch so far, plus ``"epoch"`` (1-based).
        previous_wall_s: training time of the attempts before a resume, in seconds.
    """

    def __init__(self, checkpoint: ModelCheckpoint, prefix: str = "val/") -> None:
        self.checkpoint = checkpoint
        self.prefix = prefix
        self.metrics: dict[str, float] = {}
        self.previous_wall_s = 0.0  # training time of attempts before a resume
        self._start = time.perf_counter()

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    @override
    def state_dict(self) -> dict[str, Any]:
        elapsed = self.previous_wall_s + time.perf_counter() - self._start
        return {"metrics": dict(self.metrics), "wall_s": elapsed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.metrics = dict(state_dict.get("metrics", {}))
        self.previous_wall_s = float(state_dict.get("wall_s", 0.0))

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        current = trainer.callback_metrics.get(self.checkpoint.monitor or "")
        best = self.checkpoint.best_model_score
        # ModelCheckpoint saves in on_validation_end too, and Lightning always runs checkpoint
        # callbacks last: its best score is still the previous epoch's here. It saves only on a
        # strict improvement, so a tie is not a new best either (the epoch reported must be the
        # one whose weights best.ckpt holds). No monitor (current None): every epoch is saved.
        improved = best is None or current is None or _better(current, best, self.checkpoint.mode)
        if improved:
            self.metrics = {
                k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(self.prefix)
            }
            self.metrics["epoch"] = trainer.current_epoch + 1


def _better(a: torch.Tensor, b: torch.Tensor, mode: str) -> bool:
    """Whether score ``a`` beats ``b`` under ``mode`` ("max" or "min"); both 0-d tensors."""
    return bool(a > b) if mode == "max" else bool(a < b)
