"""LearningCurve: points after log-spaced epochs, and a run with them trains exactly as one without.

The training here draws from every global generator a real one does: the DataLoader shuffles
(torch), the dataset jitters each sample with NumPy and Python ``random``, and the model has
dropout. The score callable disturbs each of them; a careless callback doing the same changes
the final weights (so the comparison can fail), LearningCurve must not.
"""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tmerge.callbacks import LearningCurve
from tmerge.callbacks.learning_curve import curve_epochs


class Jittered(Dataset):
    """24 fixed samples, each jittered when drawn with NumPy's and Python's global generators."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(24, 4, generator=g)
        self.y = self.x.sum(dim=1, keepdim=True)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        jitter = float(np.random.normal(0.0, 0.1)) + random.uniform(-0.1, 0.1)
        return self.x[i] + jitter, self.y[i]


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def train(callbacks: list[Callback], max_epochs: int = 8) -> dict[str, torch.Tensor]:
    L.seed_everything(0, verbose=False)
    model = Tiny()
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, DataLoader(Jittered(), batch_size=6, shuffle=True))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


DISTURBANCES = ("torch", "numpy", "python", "mode", "all")


def disturbing_score(what: str):
    """A score callable that consumes random numbers and/or leaves the module in eval mode."""

    def score(trainer: L.Trainer, module: L.LightningModule) -> dict[str, float]:
        if what in ("torch", "all"):
            module.train()  # a forward pass with dropout on: torch draws masks
            module.net(torch.randn(8, 4))
        if what in ("numpy", "all"):
            np.random.normal(size=3)
        if what in ("python", "all"):
            random.random()
        if what in ("mode", "all"):
            module.eval()  # and leaves it so: without a restore, dropout stays off
        return {"epoch_seen": trainer.current_epoch + 1, "w": float(module.net[0].weight.detach().sum())}

    return score


class Careless(Callback):
    """Calls a score at the same epochs as LearningCurve, restoring nothing."""

    def __init__(self, score) -> None:
        self.score = score

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 in (1, 2, 4, 8):
            self.score(trainer, pl_module)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def baseline() -> dict[str, torch.Tensor]:
    return train([])


def test_the_training_is_repeatable(baseline):
    assert same(train([]), baseline)


@pytest.mark.parametrize("what", DISTURBANCES)
def test_a_careless_scoring_pass_changes_the_training(baseline, what):
    assert not same(train([Careless(disturbing_score(what))]), baseline)


@pytest.mark.parametrize("what", DISTURBANCES)
def test_curve_points_leave_the_final_weights_bitwise_equal(baseline, what, tmp_path):
    curve = LearningCurve(disturbing_score(what), tmp_path)
    assert same(train([curve]), baseline)
    written = json.loads((tmp_path / "curve.json").read_text())
    assert [p["epoch"] for p in written["points"]] == [1, 2, 4, 8]
    assert [p["scores"]["epoch_seen"] for p in written["points"]] == [1, 2, 4, 8]
    assert [p["global_step"] for p in written["points"]] == [4, 8, 16, 32]  # 4 batches per epoch
    assert written["max_epochs"] == 8 and written["points"] == curve.points


def test_points_are_log_spaced_up_to_the_last_epoch(tmp_path):
    assert curve_epochs(10) == [1, 2, 4, 8, 10]
    assert curve_epochs(8) == [1, 2, 4, 8]
    assert curve_epochs(1) == [1]
    assert curve_epochs(3) == [1, 2, 3]
    assert curve_epochs(40) == [1, 2, 4, 8, 16, 32, 40]
    with pytest.raises(ValueError, match="max_epochs must be >= 1, got 0"):
        curve_epochs(0)
    curve = LearningCurve(lambda trainer, module: {"epoch": trainer.current_epoch + 1}, tmp_path)
    train([curve], max_epochs=10)
    assert [p["epoch"] for p in curve.points] == [1, 2, 4, 8, 10]


class StopAfter(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch + 1 == self.epoch:
            trainer.should_stop = True


def test_an_early_stop_is_scored_at_the_end(tmp_path):
    curve = LearningCurve(lambda trainer, module: {"epoch": trainer.current_epoch}, tmp_path)
    train([curve, StopAfter(3)], max_epochs=8)
    assert [p["epoch"] for p in curve.points] == [1, 2, 3]
    assert curve.points[-1]["scores"]["epoch"] == 3  # scored after the fit loop: 3 epochs completed


def fake_trainer(epoch: int, global_zero: bool) -> SimpleNamespace:
    """What the hooks read of a trainer, ``epoch`` 0-based as Lightning counts it."""
    return SimpleNamespace(
        current_epoch=epoch, max_epochs=8, global_step=10 * (epoch + 1), is_global_zero=global_zero
    )


def test_only_rank_zero_writes_and_a_resume_keeps_the_points(tmp_path):
    module = Tiny()
    other_rank = LearningCurve(lambda trainer, module: {"d": 0.5}, tmp_path)
    other_rank.on_train_start(fake_trainer(0, False), module)
    other_rank.on_train_epoch_end(fake_trainer(0, False), module)
    assert other_rank.points == [{"epoch": 1, "global_step": 10, "scores": {"d": 0.5}}]
    assert not (tmp_path / "curve.json").exists()
    first = LearningCurve(lambda trainer, module: {"d": 0.1 * trainer.current_epoch}, tmp_path)
    first.on_train_start(fake_trainer(0, True), module)
    for epoch in range(3):  # epochs 1, 2 are points, 3 is not
        first.on_train_epoch_end(fake_trainer(epoch, True), module)
    resumed = LearningCurve(lambda trainer, module: {"d": 0.1 * trainer.current_epoch}, tmp_path)
    resumed.load_state_dict(first.state_dict())
    resumed.on_train_start(fake_trainer(3, True), module)
    resumed.on_train_epoch_end(fake_trainer(3, True), module)
    written = json.loads((tmp_path / "curve.json").read_text())
    assert [p["epoch"] for p in written["points"]] == [1, 2, 4]
    assert [p["scores"]["d"] for p in written["points"]] == pytest.approx([0.0, 0.1, 0.3])


def test_bad_arguments_and_scores_are_named(tmp_path):
    with pytest.raises(TypeError, match="score must be callable.*got 'dice'"):
        LearningCurve("dice", tmp_path)
    with pytest.raises(TypeError, match="folder must be a path, got None"):
        LearningCurve(lambda t, m: {}, None)
    with pytest.raises(TypeError, match="file_name must be a plain file name, got 'a/b.json'"):
        LearningCurve(lambda t, m: {}, tmp_path, "a/b.json")
    module = Tiny()
    bad = LearningCurve(lambda t, m: {"dice": "high"}, tmp_path)
    with pytest.raises(TypeError, match=r"score returned \{'dice': 'high'\} at epoch 1, not numbers"):
        bad.on_train_epoch_end(fake_trainer(0, True), module)
    module.train()
    worse = LearningCurve(lambda t, m: m.eval() and 0.5, tmp_path)
    with pytest.raises(TypeError, match="returned 0.5 at epoch 1, not a mapping"):
        worse.on_train_epoch_end(fake_trainer(0, True), module)
    assert module.training and module.net[2].training  # restored even though the score failed


def test_the_last_point_can_come_from_the_final_test(tmp_path):
    """``score_last=False``: the fit scores every point but the last; the stage adds the final
    test's scores, and a resumed stage whose fit was not repeated keeps the earlier points."""
    calls: list[int] = []

    def score(trainer, module):
        calls.append(trainer.current_epoch + 1)
        return {"d": 0.1 * (trainer.current_epoch + 1)}

    curve = LearningCurve(score, tmp_path, score_last=False)
    train([curve], max_epochs=10)
    assert calls == [1, 2, 4, 8]  # no scoring pass after epoch 10
    curve.add(10, 40, {"d": 0.9})
    written = json.loads((tmp_path / "curve.json").read_text())
    assert written["max_epochs"] == 10
    assert [(p["epoch"], p["global_step"]) for p in written["points"]] == [(1, 4), (2, 8), (4, 16), (8, 32), (10, 40)]
    assert [p["scores"]["d"] for p in written["points"]] == pytest.approx([0.1, 0.2, 0.4, 0.8, 0.9])
    resumed = LearningCurve(score, tmp_path, score_last=False)  # the fit was done: no hook ran
    resumed.add(10, 40, {"d": 0.95})
    again = json.loads((tmp_path / "curve.json").read_text())
    assert again["max_epochs"] == 10 and [p["epoch"] for p in again["points"]] == [1, 2, 4, 8, 10]
    assert again["points"][-1]["scores"] == {"d": 0.95}
    with pytest.raises(TypeError, match=r"score returned \['d'\] at epoch 10, not a mapping"):
        resumed.add(10, 40, ["d"])


def test_an_early_stop_is_still_scored_without_the_last_point(tmp_path):
    """Only the final epoch of a full budget is left to the caller: an early stop is scored."""
    curve = LearningCurve(lambda trainer, module: {"e": trainer.current_epoch}, tmp_path, score_last=False)
    train([curve, StopAfter(3)], max_epochs=8)
    assert [p["epoch"] for p in curve.points] == [1, 2, 3]
