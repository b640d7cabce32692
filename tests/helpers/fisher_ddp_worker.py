"""Helper for ``tests/test_fisher.py``: a tiny Lightning training with :class:`FisherCallback`.

Run as a script (``python tests/helpers/fisher_ddp_worker.py OUT_DIR DEVICES``) so that Lightning's DDP
launcher can re-run this very command for the other ranks. Rank 0 writes ``OUT_DIR/info.json``
naming the best and the last checkpoint; the callback writes ``OUT_DIR/fisher.safetensors``.
The test imports :func:`make_net`, :func:`make_dataset` and :func:`sample_loss` from here to
recompute the Fisher in a single process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tmerge.callbacks import FisherCallback

N_SAMPLES = 7  # odd: the two ranks get 4 and 3 samples
C, K, S = 2, 3, 6


def make_net() -> nn.Module:
    """A small, well-conditioned net with the layer kinds of Isensee2017 (norm, dropout)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv3d(C, 4, 3, padding=1, bias=False),
        nn.InstanceNorm3d(4, affine=True),
        nn.LeakyReLU(0.01),
        nn.Dropout3d(0.3),
        nn.Conv3d(4, K, 1),
    )


class SampleDataset(torch.utils.data.Dataset):
    """Deterministic un-batched ``{"image": (C, S, S, S), "label": (S, S, S)}`` samples."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.images = torch.randn(N_SAMPLES, C, S, S, S, generator=g)
        self.labels = torch.randint(0, K, (N_SAMPLES, S, S, S), generator=g)

    def __len__(self) -> int:
        return N_SAMPLES

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"image": self.images[index], "label": self.labels[index]}


def make_dataset() -> SampleDataset:
    return SampleDataset()


def sample_loss(output: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(output, target)


class TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def sample_loss(self, output: Tensor, target: Tensor) -> Tensor:
        return sample_loss(output, target)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self.net(batch["image"]), batch["label"])
        # "score" is best at epoch 0, so the best checkpoint differs from the final weights.
        self.log("score", -float(self.current_epoch), on_epoch=True, on_step=False, sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


class TinyData(pl.LightningDataModule):
    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(make_dataset(), batch_size=2)

    def fisher_dataset(self) -> torch.utils.data.Dataset:
        return make_dataset()


def main(out: Path, devices: int) -> None:
    pl.seed_everything(0, workers=True)
    # The first ModelCheckpoint is trainer.checkpoint_callback (the one the Fisher uses); the
    # second, unmonitored, keeps the final weights for the test's "not the last weights" check.
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=out / "checkpoints", monitor="score", mode="max", save_top_k=1
    )
    final = pl.callbacks.ModelCheckpoint(dirpath=out / "checkpoints", filename="final")
    fisher = FisherCallback(method="auto")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
        callbacks=[checkpoint, final, fisher],
    )
    module = TinyModule()
    trainer.fit(module, datamodule=TinyData())
    if trainer.is_global_zero:
        best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        held = module.state_dict()
        info = {
            "best": checkpoint.best_model_path,
            "last": final.best_model_path,
            "world": trainer.world_size,
            # What the caller may rely on instead of loading the best checkpoint again.
            "fisher_best_path": fisher.best_path,
            "module_holds_best": set(held) == set(best) and all(torch.equal(held[k], best[k]) for k in best),
        }
        (out / "info.json").write_text(json.dumps(info))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
