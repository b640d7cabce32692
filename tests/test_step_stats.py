"""``StepStats`` (``trainer.step_stats``): steps of known duration fed by loaders of known speed
must give the step time and the waiting share worked out here; the file survives an error; the
runner writes it into the fit's folder when asked to, and only then."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from tmerge.callbacks import StepStats
from tmerge.runner import TrainerConfig, fit
from tmerge.runs import STEP_STATS_FILE

STEP_S = 0.03  # each training step sleeps this long


class _Slow(Dataset):
    """``n`` items, each taking ``delay_s`` to fetch (a loader that cannot keep up)."""

    def __init__(self, n: int, delay_s: float) -> None:
        self.n, self.delay_s = n, delay_s

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        time.sleep(self.delay_s)
        return torch.ones(1)


class _Sleeper(L.LightningModule):
    """A step of ``STEP_S``; a pause of 0.3 s at each epoch's end (as validation would be), which
    must not count as waiting; an error at step ``fail_at`` if given."""

    def __init__(self, fail_at: int | None = None) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.fail_at = fail_at

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        if self.global_step == self.fail_at:
            raise RuntimeError("planted failure")
        time.sleep(STEP_S)
        return (self.w * batch).sum()

    def on_train_epoch_end(self) -> None:
        time.sleep(0.3)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/dice", 0.5)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(module: L.LightningModule, delay_s: float, path: Path, accelerator: str = "cpu") -> dict:
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[StepStats(path, warmup=2)],
    )
    trainer.fit(module, train_dataloaders=DataLoader(_Slow(4, delay_s), batch_size=1))
    return json.loads(path.read_text())


def test_a_slow_loader_shows_as_the_share_of_time_waited(tmp_path: Path) -> None:
    """Fetching takes 0.09 s, a step 0.03 s: the loop waits 3/4 of its time."""
    stats = _fit(_Sleeper(), 0.09, tmp_path / "stats.json")
    # 2 epochs of 4 steps; the first 2 apart; a wait only where the next step is in the same
    # epoch (epoch 1: step 3; epoch 2: steps 5, 6, 7), never across the 0.3 s epoch-end pause.
    assert (stats["epochs"], stats["steps"], stats["warmup_steps"]) == (2, 6, 2)
    assert stats["clock"] == "host" and stats["device"] == "cpu"
    assert STEP_S <= stats["busy_s"] < STEP_S + 0.03
    assert 0.09 <= stats["wait_s"] < 0.2  # < 0.3: the epoch-end pause is not in it
    assert 0.12 <= stats["s_per_step"] < 0.25 and stats["median_s_per_step"] >= 0.12
    assert 0.6 < stats["wait_share"] < 0.9
    assert stats["host_between_s"] >= 0.09 and stats["peak_rss_mib"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_device_clock_sees_the_wait(tmp_path: Path) -> None:
    """The device idles while the loader sleeps: CUDA events see the same share."""
    stats = _fit(_Sleeper(), 0.09, tmp_path / "stats.json", accelerator="gpu")
    assert stats["clock"] == "cuda events" and stats["steps"] == 6
    assert 0.6 < stats["wait_share"] < 0.95 and stats["peak_allocated_mib"] >= 0


def test_a_loader_that_keeps_up_leaves_no_wait(tmp_path: Path) -> None:
    stats = _fit(_Sleeper(), 0.0, tmp_path / "stats.json")
    assert stats["steps"] == 6 and STEP_S <= stats["busy_s"] < STEP_S + 0.03
    assert stats["wait_share"] < 0.3


def test_an_interrupted_fit_keeps_what_was_measured(tmp_path: Path) -> None:
    path = tmp_path / "stats.json"
    with pytest.raises(RuntimeError, match="planted failure"):
        _fit(_Sleeper(fail_at=6), 0.0, path)
    stats = json.loads(path.read_text())
    assert stats["steps"] == 4  # steps 3…6 of the 6 that ran (the 7th failed before its end)
    assert stats["warmup_steps"] == 2 and len(stats["warmup_s"]) == 2


def test_warmup_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="warmup must be >= 0"):
        StepStats("x.json", warmup=-1)


class _Data(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Slow(4, 0.0), batch_size=1)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Slow(1, 0.0), batch_size=1)


@pytest.mark.parametrize("enabled", [True, False])
def test_the_runner_writes_step_stats_only_when_asked(tmp_path: Path, enabled: bool) -> None:
    cfg = TrainerConfig(accelerator="cpu", max_epochs=1, step_stats=enabled)
    fit(_Sleeper(), _Data(), run_dir=tmp_path, trainer_cfg=cfg)
    path = tmp_path / STEP_STATS_FILE
    assert path.is_file() == enabled
    if enabled:
        assert json.loads(path.read_text())["steps"] == 2  # 4 steps, 2 of them warm-up
