"""tmerge.callbacks: every Lightning callback in one place, hooks that really override, state
that survives a resume, and the non-finite guard driven through its hooks."""

from __future__ import annotations

import inspect
import logging
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

import tmerge.callbacks
from tmerge.callbacks import BestMetrics, EpochSummary, NonFiniteGuard, RngState, SaveOnSigterm, StopIfStopped
from tmerge.errors import NonFiniteError

CALLBACKS = [getattr(tmerge.callbacks, name) for name in tmerge.callbacks.__all__]


def test_every_callback_is_exported_and_one_per_module() -> None:
    assert all(issubclass(c, Callback) for c in CALLBACKS)
    modules = [c.__module__ for c in CALLBACKS]
    assert len(set(modules)) == len(modules)
    assert all(m.startswith("tmerge.callbacks.") for m in modules)


@pytest.mark.parametrize("callback", CALLBACKS, ids=lambda c: c.__name__)
def test_hooks_are_real_overrides(callback: type[Callback]) -> None:
    """A misspelt hook (``on_validation_ends``) would silently never run: every ``on_*`` or state
    method a callback defines must exist on Lightning's Callback and carry ``@override``."""
    defined = {
        name: f
        for name, f in vars(callback).items()
        if inspect.isfunction(f) and (name.startswith("on_") or name in ("state_dict", "load_state_dict"))
    }
    assert defined, f"{callback.__name__} overrides no hook"
    for name, f in defined.items():
        assert hasattr(Callback, name), f"{callback.__name__}.{name} is not a Lightning hook"
        assert getattr(f, "__override__", False), f"{callback.__name__}.{name} lacks @override"


def test_state_keys_did_not_move_with_the_classes() -> None:
    """Checkpoints written before the callbacks moved store their states under these keys; a
    resume finds them only if the keys stay the same."""
    checkpoint = ModelCheckpoint(monitor="val/dice", mode="max")
    assert BestMetrics(checkpoint).state_key == "BestMetrics"
    assert RngState().state_key == "RngState"


# ---- NonFiniteGuard through its hooks ---------------------------------------------------------


def _batch_hooks(guard: NonFiniteGuard, loss, *, step: int, epoch: int, batch_idx: int, subjects=()):
    trainer = SimpleNamespace(global_step=step, current_epoch=epoch)
    batch = {"image": torch.zeros(1), "subject": list(subjects)}
    guard.on_train_batch_start(trainer, None, batch, batch_idx)
    # By on_train_batch_end the optimiser has stepped: global_step already counts this batch.
    trainer.global_step = step + 1
    guard.on_train_batch_end(trainer, None, loss, batch, batch_idx)


def test_guard_hooks_name_the_batch_the_step_ran_at() -> None:
    guard = NonFiniteGuard(every=4)
    _batch_hooks(guard, {"loss": torch.tensor(0.5)}, step=6, epoch=1, batch_idx=2, subjects=["a"])
    _batch_hooks(guard, None, step=7, epoch=1, batch_idx=3)  # a skipped step: nothing to observe
    with pytest.raises(NonFiniteError, match=r"became inf at epoch 2, step 8 \(batch 4 .*subjects c, d\)"):
        _batch_hooks(
            guard, {"loss": torch.tensor(float("inf"))}, step=8, epoch=1, batch_idx=4, subjects=["c", "d"]
        )


def test_guard_checks_at_the_end_of_each_epoch() -> None:
    """On an accelerator the guard looks only every ``every`` steps; the epoch end looks too, so
    a NaN in an epoch's last few steps is not carried into validation."""
    guard = NonFiniteGuard(every=25)
    guard.on_train_epoch_end(SimpleNamespace(), None)  # nothing observed: nothing to raise
    # What observe() leaves on a GPU between host checks (a CPU loss is checked at once).
    guard._first_bad = torch.tensor(3)
    guard._value = torch.tensor(float("nan"))
    with pytest.raises(NonFiniteError, match="at step 3"):
        guard.on_train_epoch_end(SimpleNamespace(), None)


def test_guard_stops_every_ddp_rank_through_the_strategy() -> None:
    decisions = []

    def reduce_boolean_decision(flag: bool, all: bool) -> bool:
        decisions.append((flag, all))
        return True  # another rank saw a NaN

    guard = NonFiniteGuard()
    guard.on_train_start(
        SimpleNamespace(
            world_size=2, strategy=SimpleNamespace(reduce_boolean_decision=reduce_boolean_decision)
        ),
        None,
    )
    with pytest.raises(NonFiniteError, match="another DDP rank"):
        _batch_hooks(guard, {"loss": torch.tensor(0.5)}, step=0, epoch=0, batch_idx=0)
    assert decisions == [(False, False)]  # "any rank", not "all ranks"


def test_segmentation_module_brings_its_guard() -> None:
    from tmerge.modules.segmentation import SegmentationModule

    module = SegmentationModule(
        torch.nn.Conv3d(1, 2, 1), output_mode="softmax", class_names=["a"], patch_size=8
    )
    assert module.configure_callbacks() == [module.nonfinite]
    assert isinstance(module.nonfinite, NonFiniteGuard)


# ---- state across a resume ----------------------------------------------------------------------


def _validated(summary: EpochSummary, dice: float, epoch: int) -> None:
    trainer = SimpleNamespace(
        sanity_checking=False,
        is_global_zero=True,
        callback_metrics={"val/dice": torch.tensor(dice)},
        current_epoch=epoch,
        max_epochs=10,
    )
    summary.on_validation_end(trainer, None)


def test_epoch_summary_keeps_its_best_across_a_resume() -> None:
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("tmerge")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        first = EpochSummary("task1", "val/dice", "max")
        assert first.state_dict() == {}  # nothing seen yet: no checkpoint entry
        _validated(first, 0.8, 0)
        saved = first.state_dict()
        resumed = EpochSummary("task1", "val/dice", "max")
        resumed.load_state_dict(saved)
        _validated(resumed, 0.6, 1)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert saved == {"best": pytest.approx(0.8)}
    assert "epoch 2/10: val/dice 0.6000 (best val/dice 0.8000)" in lines[-1]


def test_stateless_callbacks_save_nothing(tmp_path) -> None:
    """Their state is another callback's (StopIfStopped reads EarlyStopping's) or this attempt's
    only: nothing of theirs goes into a checkpoint."""
    stopper = EarlyStopping(monitor="val/dice", mode="max", patience=2)
    for callback in (
        StopIfStopped(stopper),
        SaveOnSigterm(tmp_path),
        NonFiniteGuard(),
        tmerge.callbacks.FisherCallback(),
    ):
        assert callback.state_dict() == {}


def test_best_metrics_state_round_trip() -> None:
    checkpoint = ModelCheckpoint(monitor="val/dice", mode="max")
    best = BestMetrics(checkpoint)
    best.metrics = {"val/dice": 0.7, "epoch": 3}
    best.previous_wall_s = 10.0
    state = best.state_dict()
    again = BestMetrics(checkpoint)
    again.load_state_dict(state)
    assert again.metrics == {"val/dice": 0.7, "epoch": 3}
    assert again.previous_wall_s >= 10.0  # this attempt's time is added to the earlier ones'


class _ScriptedDice(L.LightningModule):
    """Logs a given validation Dice per epoch, so a test decides which epochs tie."""

    def __init__(self, dice: list[float]) -> None:
        super().__init__()
        self.dice = dice
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx) -> None:
        self.log("val/dice", self.dice[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_best_metrics_names_the_epoch_the_checkpoint_saved(tmp_path) -> None:
    """A tie with the best score is not a new best: ModelCheckpoint saves only on a strict
    improvement, so the epoch BestMetrics reports (into stages.json, alphas.json) must be the one
    whose weights ``best.ckpt`` holds, not the later epoch that tied it."""
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(2, 1)), batch_size=2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="best", monitor="val/dice", mode="max")
    best = BestMetrics(checkpoint)
    trainer = L.Trainer(
        max_epochs=4,
        accelerator="cpu",
        callbacks=[best, checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(_ScriptedDice([0.5, 0.7, 0.7, 0.6]), data, data)
    saved = torch.load(tmp_path / "best.ckpt", weights_only=False)
    assert saved["epoch"] + 1 == 2  # the first epoch to reach 0.7
    assert best.metrics["epoch"] == 2
    assert best.metrics["val/dice"] == pytest.approx(0.7)


class _Mixer(L.LightningModule):
    """δ of a 2-source, 3-layer mixing pulled towards the first source, with or without a
    validation step."""

    def __init__(self) -> None:
        super().__init__()
        from tmerge.merge.mixing import LayerwiseMixing

        self.mixing = LayerwiseMixing(2, ["a", "b", "c"])

    def training_step(self, batch, batch_idx):
        return -self.mixing()[0].sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", -self.mixing()[0].sum().detach())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _fit_mixer(limit_val_batches: int) -> list[dict]:
    from torch.utils.data import DataLoader

    from tmerge.callbacks import AlphaTrajectory

    module = _Mixer()
    trajectory = AlphaTrajectory(module.mixing, ["task1", "task2"])
    data = DataLoader(torch.zeros(2, 1), batch_size=1)
    trainer = L.Trainer(
        max_epochs=3,
        limit_val_batches=limit_val_batches,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[trajectory],
    )
    trainer.fit(module, data, data if limit_val_batches else None)
    assert trajectory.trajectory[-1]["alphas"] == module.mixing.alphas_dict()  # the α it ends with
    return trajectory.trajectory


def test_alpha_trajectory_has_an_entry_per_epoch_with_or_without_validation() -> None:
    """With validation, one entry per validated epoch with its loss; without any (the fixed
    protocol), one per epoch, loss None — before this, such a stage recorded no trajectory."""
    validated = _fit_mixer(limit_val_batches=1)
    assert [e["epoch"] for e in validated] == [1, 2, 3]
    assert all(isinstance(e["val_loss"], float) for e in validated)
    unvalidated = _fit_mixer(limit_val_batches=0)
    assert [e["epoch"] for e in unvalidated] == [1, 2, 3]
    assert all(e["val_loss"] is None for e in unvalidated)
    first = [e["alphas"]["a"][0] for e in unvalidated]
    assert first == sorted(first) and first[0] > 0.5  # α of task1 grows epoch by epoch
