"""Writes the newest checkpoint when SIGTERM stops a fit, so the re-run resumes from that step."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from tmerge.runs import LAST_CKPT


class SaveOnSigterm(Callback):
    """On SIGTERM (raised by Lightning at the next batch boundary), write :data:`LAST_CKPT` so that
    the re-run resumes from the current step rather than the last epoch end.

    No ``state_dict``: :attr:`saved` describes this attempt only (the stage reports it when it
    stops), and the checkpoint it writes is what the next attempt resumes from.

    Args:
        run_dir: the run folder; the checkpoint is ``run_dir / LAST_CKPT``.

    Attributes:
        path: the checkpoint it writes.
        saved: whether it wrote one in this attempt.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LAST_CKPT
        self.saved = False

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            trainer.save_checkpoint(self.path)  # every rank calls it; rank 0 writes, atomically
            self.saved = True
