"""Test scores after log-spaced epochs (1, 2, 4, 8, … and the last), without changing the training."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from tmerge.io import read_json, write_json
from tmerge.runs import CURVE_FILE

#: ``score(trainer, pl_module) -> {name: value}``: the scores of the module as it is now.
ScoreFn = Callable[[L.Trainer, L.LightningModule], Mapping[str, float]]


def curve_epochs(max_epochs: int) -> list[int]:
    """The epochs a curve is scored after: the powers of two up to ``max_epochs``, and
    ``max_epochs`` itself (``10 → [1, 2, 4, 8, 10]``; ``8 → [1, 2, 4, 8]``).

    Raises:
        ValueError: ``max_epochs < 1``.
    """
    if max_epochs < 1:
        raise ValueError(f"curve_epochs: max_epochs must be >= 1, got {max_epochs}")
    epochs, e = [], 1
    while e <= max_epochs:
        epochs.append(e)
        e *= 2
    return epochs if epochs[-1] == max_epochs else [*epochs, max_epochs]


def _capture_rng() -> dict[str, Any]:
    """Every global generator a training draws from: Python's, NumPy's legacy one (the whole
    state, its cached Gaussian included), torch's CPU one and, once CUDA is initialised, each
    device's."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def untouched(module: torch.nn.Module) -> Iterator[None]:
    """Run a scoring pass that leaves no trace on a training: under ``torch.no_grad()``, with
    every global generator (:func:`_capture_rng`) and every submodule's train/eval flag
    restored afterwards."""
    rng = _capture_rng()
    modes = {name: m.training for name, m in module.named_modules()}
    try:
        with torch.no_grad():
            yield
    finally:
        _restore_rng(rng)
        for name, m in module.named_modules():
            if name in modes:
                m.training = modes[name]


class LearningCurve(Callback):
    """Scores the module after epochs 1, 2, 4, 8, … and the last (:func:`curve_epochs` of
    ``trainer.max_epochs``), and writes the points to ``folder / file_name`` as JSON.

    A scoring pass leaves no trace on the training: the global generators (Python ``random``,
    NumPy, torch CPU and, once initialised, CUDA) are saved before it and restored after it, and
    so is every submodule's train/eval flag; ``score`` runs under ``torch.no_grad()``. So a run
    with curve points draws the same batches, patches and dropout masks, and ends with the same
    weights, as one without (a test checks bitwise). What it cannot undo is anything ``score``
    changes besides those: it must not step an optimiser, update buffers in place (batch-norm
    statistics in train mode), or draw from a generator initialised only for it.

    When a fit stops before ``max_epochs`` (early stopping), the epoch it stopped after is scored
    at the end of training, if it was not a point already; an interrupted fit is not.

    ``score`` is called on every rank (so it may use collective operations); only rank 0 writes
    the file, atomically, after every point, so a stopped run keeps the points it reached.

    With ``score_last=False`` the last epoch of a fit that reaches ``max_epochs`` is not scored
    here: the caller tests those final weights anyway and hands the scores to :meth:`add`, which
    saves one full pass over the test subjects per run (the fixed protocol's targets do this; the
    curve's last point equalled the final test in every one of 63 benchmark runs, bit for bit).

    Args:
        score: ``score(trainer, pl_module) -> {name: value}``, e.g. the mean test Dice of the
            module's current weights; values must convert to ``float``.
        folder: the folder of the file (the run folder).
        file_name: the file's name.
        score_last: score the final epoch here (False: :meth:`add` it from the final test).

    Raises:
        TypeError: ``score`` is not callable, ``folder`` is not a path; at a point, ``score``
            returns something other than a mapping of names to numbers.

    Attributes:
        points: ``[{"epoch": completed epochs, "global_step": int, "scores": {name: float}}]``,
            by epoch. Saved in checkpoints, so a resumed fit keeps the points of earlier attempts.

    The file: ``{"max_epochs": int | None, "points": points}``.

    Example:
        >>> curve = LearningCurve(lambda trainer, module: {"dice": test_dice(module)}, run_dir)
        >>> trainer = L.Trainer(max_epochs=10, callbacks=[curve])  # points 1, 2, 4, 8, 10
    """

    def __init__(
        self, score: ScoreFn, folder: str | os.PathLike, file_name: str = CURVE_FILE, score_last: bool = True
    ) -> None:
        if not callable(score):
            raise TypeError(f"LearningCurve: score must be callable(trainer, pl_module), got {score!r}")
        if not isinstance(folder, str | os.PathLike):
            raise TypeError(f"LearningCurve: folder must be a path, got {folder!r}")
        if not isinstance(file_name, str) or not file_name or Path(file_name).name != file_name:
            raise TypeError(f"LearningCurve: file_name must be a plain file name, got {file_name!r}")
        self.score = score
        self.score_last = score_last
        self.path = Path(folder) / file_name
        self.points: list[dict[str, Any]] = []
        self._max_epochs: int | None = None

    def _scored(self) -> set[int]:
        return {p["epoch"] for p in self.points}

    def _due_here(self, epoch: int) -> bool:
        return self.score_last or self._max_epochs is None or epoch != self._max_epochs

    def _add(self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int) -> None:
        with untouched(pl_module):
            scores = self.score(trainer, pl_module)
        self.add(epoch, int(trainer.global_step), scores, write=trainer.is_global_zero)

    def add(self, epoch: int, global_step: int, scores: Mapping[str, Any], write: bool = True) -> None:
        """Record the point of ``epoch`` (completed epochs) with its ``scores``, replacing any
        earlier one of that epoch, and (``write``: on rank 0) save the file. If this callback
        has seen no training (a finished fit is not repeated on resume), the points and
        ``max_epochs`` already in the file are kept.

        Raises:
            TypeError: ``scores`` is not a mapping of names to numbers.
        """
        if not self.points and self._max_epochs is None and self.path.is_file():
            saved = read_json(self.path)
            self.points, self._max_epochs = [dict(p) for p in saved["points"]], saved["max_epochs"]
        if not isinstance(scores, Mapping):
            raise TypeError(f"LearningCurve: score returned {scores!r} at epoch {epoch}, not a mapping")
        try:
            values = {str(k): float(v) for k, v in scores.items()}
        except (TypeError, ValueError):
            raise TypeError(
                f"LearningCurve: score returned {dict(scores)!r} at epoch {epoch}, not numbers"
            ) from None
        # A resumed epoch replaces the point its first attempt may have left.
        self.points = sorted(
            [p for p in self.points if p["epoch"] != epoch]
            + [{"epoch": epoch, "global_step": global_step, "scores": values}],
            key=lambda p: p["epoch"],
        )
        if write:
            write_json(self.path, {"max_epochs": self._max_epochs, "points": self.points})

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's "no limit" is None or -1: then the powers of two only, and the end.
        limit = trainer.max_epochs
        self._max_epochs = limit if limit is not None and limit > 0 else None

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1  # completed epochs
        due = epoch in curve_epochs(self._max_epochs) if self._max_epochs else epoch & (epoch - 1) == 0
        if due and epoch not in self._scored() and self._due_here(epoch):
            self._add(trainer, pl_module, epoch)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch  # after the fit loop: the epochs completed
        if epoch >= 1 and not trainer.interrupted and epoch not in self._scored() and self._due_here(epoch):
            self._add(trainer, pl_module, epoch)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"points": [dict(p) for p in self.points]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.points = [dict(p) for p in state_dict.get("points", [])]
