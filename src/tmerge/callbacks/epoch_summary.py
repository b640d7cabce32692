"""One progress line per validated epoch, in place of Lightning's progress bars."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

log = logging.getLogger("tmerge")


class EpochSummary(Callback):
    """One ``[tmerge]`` line per validated epoch: losses, the monitored score, best so far, time.

    The best score so far is saved in checkpoints, so that after a resume "best" still means
    the best of every epoch, not only of those since the resume. The time is this attempt's.

    Args:
        name: the run's label at the start of each line.
        monitor: the metric whose best value is shown (e.g. ``"val/dice"``).
        mode: ``"max"`` or ``"min"``: which direction is better for ``monitor``.
    """

    def __init__(self, name: str, monitor: str, mode: str) -> None:
        self.name, self.monitor, self.mode = name, monitor, mode
        self.best: float | None = None
        self.start = time.perf_counter()

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.limit_val_batches == 0:  # no validation (a fixed budget): one line per epoch
            self.on_validation_end(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        score = metrics.get(self.monitor)
        if score is not None:
            value = float(score)
            if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
                self.best = value
        parts = [
            f"{k} {float(metrics[k]):.4f}" for k in ("train/loss", "val/loss", "val/dice") if k in metrics
        ]
        best = f" (best {self.monitor} {self.best:.4f})" if self.best is not None else ""
        log.info(
            "%s epoch %d/%d: %s%s, %.0f s",
            self.name,
            trainer.current_epoch + 1,
            trainer.max_epochs,
            ", ".join(parts),
            best,
            time.perf_counter() - self.start,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        # Empty until a score was seen: Lightning stores no entry for an empty state.
        return {} if self.best is None else {"best": self.best}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        best = state_dict.get("best")
        self.best = None if best is None else float(best)
