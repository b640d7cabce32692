"""Helper for ``tests/test_slurm.py``: a tiny fit through :func:`tmerge.runner.fit`, run under
``SLURM_*`` variables so that Lightning installs its auto-requeue handler.

``python tests/helpers/slurm_requeue_worker.py RUN_DIR [PREEMPT_AT]``: with ``PREEMPT_AT`` the process
sends itself SIGUSR1 after that optimiser step, as SLURM does ``--signal`` seconds before the time
limit (Lightning then writes ``hpc_ckpt_<k>.ckpt`` and calls ``scontrol requeue``), and is then
killed without a chance to save anything else, as SLURM kills a job it requeues. Without it, the
fit runs (or resumes) to its end.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from tmerge.runner import TrainerConfig, fit

STEPS_PER_EPOCH = 4
EPOCHS = 3


class Regression(L.LightningModule):
    """y = x·w on 4 features; logs ``val/loss``."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Data(L.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4 * STEPS_PER_EPOCH, 4, generator=g)
        self.data = TensorDataset(x, x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]))

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=4)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=8)


class Preempt(L.Callback):
    """SIGUSR1 after step ``at``, then a kill once Lightning's handler has saved its checkpoint."""

    def __init__(self, at: int, run_dir: Path) -> None:
        self.at, self.run_dir = at, run_dir

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.at:
            return
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(100):  # the handler runs in this thread at the next bytecode; be safe
            if list(self.run_dir.glob("hpc_ckpt_*.ckpt")):
                break
            time.sleep(0.05)
        logging.getLogger("tmerge").info("preempted after step %d", trainer.global_step)
        os._exit(137)  # SLURM's SIGKILL: nothing else gets written


def main(run_dir: Path, preempt_at: int | None) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s", stream=sys.stdout)
    callbacks = [Preempt(preempt_at, run_dir)] if preempt_at is not None else []
    L.seed_everything(0, verbose=False)
    trainer_cfg = TrainerConfig(accelerator="cpu", max_epochs=EPOCHS, patience=EPOCHS, log_every_n_steps=1)
    _, result = fit(
        Regression(),
        Data(),
        run_dir=run_dir,
        trainer_cfg=trainer_cfg,
        monitor="val/loss",
        mode="min",
        callbacks=callbacks,
        name="requeue",
    )
    print(f"finished after {result.epochs} epochs")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None)
