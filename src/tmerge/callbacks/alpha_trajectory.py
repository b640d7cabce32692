"""Records the T-IMM mixing ratios α after every validated epoch of the adaption stage (every
epoch where the stage never validates: the fixed protocol)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from tmerge.merge.mixing import LayerwiseMixing


class AlphaTrajectory(Callback):
    """Keeps α per layer after each validation of the adaption stage and logs it; in a stage
    that never validates (``limit_val_batches=0``, the fixed protocol) after each epoch instead,
    with the monitored value ``None``.

    The paper's Fig. 5 shows the α the stage ends with; the trajectory shows whether they had
    converged or were still moving when the stage stopped.

    Args:
        mixing: the adaption network's :class:`~tmerge.merge.LayerwiseMixing` (δ).
        sources: the T source names, in the row order of α.
        monitor: the validation metric stored beside each epoch's α.

    Attributes:
        trajectory: one entry per validated epoch (per epoch without validation), ``{"epoch": int
            (1-based), "<monitor>": float | None, "alphas": {layer: [α^1, …, α^T]}}``. Saved in checkpoints, so a resumed stage
            keeps the epochs of earlier attempts.

    Logged (every logger, at the epoch's global step): ``adaption/alpha_<source>/<layer>`` for
    every source and layer, so that W&B draws one line per layer over the steps.

    Example:
        >>> callback = AlphaTrajectory(adaptive.mixing, ["task1", "task2"])
    """

    def __init__(self, mixing: LayerwiseMixing, sources: list[str], monitor: str = "val/loss") -> None:
        if len(sources) != mixing.n_models:
            raise ValueError(
                f"AlphaTrajectory: {len(sources)} source names for {mixing.n_models} mixed models"
            )
        self._mixing = mixing
        self.sources = list(sources)
        self.monitor = monitor
        self.trajectory: list[dict[str, Any]] = []

    @property
    def monitor_key(self) -> str:
        """The key of the monitored metric in a trajectory entry (``val_loss`` for ``val/loss``)."""
        return self.monitor.replace("/", "_")

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._record(trainer)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.limit_val_batches == 0:  # no validation will ever record this epoch
            self._record(trainer)

    def _record(self, trainer: L.Trainer) -> None:
        alphas = self._mixing.alphas_dict()
        value = trainer.callback_metrics.get(self.monitor)
        epoch = trainer.current_epoch + 1
        # A resumed epoch replaces the entry its first attempt may have left.
        self.trajectory = [e for e in self.trajectory if e["epoch"] != epoch]
        self.trajectory.append(
            {"epoch": epoch, self.monitor_key: None if value is None else float(value), "alphas": alphas}
        )
        metrics = {
            f"adaption/alpha_{source}/{layer}": values[t]
            for layer, values in alphas.items()
            for t, source in enumerate(self.sources)
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"trajectory": list(self.trajectory)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.trajectory = list(state_dict.get("trajectory", []))
