"""Makes early stopping survive a resume."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback, EarlyStopping
from typing_extensions import override


class StopIfStopped(Callback):
    """Early stopping survives a resume: ``EarlyStopping`` stops by setting
    ``trainer.should_stop``, which no checkpoint keeps, so a run resumed from the checkpoint of
    the epoch that stopped it (killed during the Fisher, say) would train on. Its patience
    counter is restored, though: stop again before the first step if it had run out.

    No ``state_dict`` of its own: what it reads (``wait_count``, ``patience``) is the
    ``EarlyStopping``'s state, which Lightning restores from the checkpoint before
    ``on_train_start``.

    Args:
        stopper: the fit's ``EarlyStopping`` callback.
    """

    def __init__(self, stopper: EarlyStopping) -> None:
        self.stopper = stopper

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stopper.wait_count >= self.stopper.patience:
            trainer.should_stop = True
