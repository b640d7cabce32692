"""Stopping a fit when its training loss stops being a number, without stalling the GPU.

Checking ``torch.isfinite(loss)`` on the host every step forces a device synchronisation per
step. :class:`NonFiniteGuard` instead keeps, on the loss's device, the first step whose loss was
not finite, and looks at it every ``every`` steps (every step on a CPU, where looking is free).
It remembers the last few batches (step, epoch, batch index, subjects) on the host, so the error
still names the batch that failed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from tmerge.errors import NonFiniteError
from tmerge.runs import LAST_CKPT


@dataclass(frozen=True)
class BatchInfo:
    """Where one training batch sat: optimiser step, epoch (0-based), index in the epoch, subjects."""

    step: int
    epoch: int
    batch_idx: int
    subjects: tuple[str, ...]


class NonFiniteGuard(Callback):
    """Watches training losses; :meth:`check` raises :class:`~tmerge.errors.NonFiniteError`.

    As a callback it observes the loss each ``training_step`` returned (``on_train_batch_end``),
    under the step, epoch and batch index the step ran at (``on_train_batch_start``: by the end of
    the batch the optimiser has stepped and ``global_step`` counts one more), checks at the end of
    every training epoch, and under DDP stops every rank together. :meth:`observe` and
    :meth:`check` also work without a trainer.

    No ``state_dict``: it only ever holds the losses of the current attempt, and a non-finite
    loss ends that attempt.

    Args:
        every: host checks on an accelerator every ``every`` steps (CPU: every step).

    Attributes:
        any_rank: Under DDP, ``flag -> bool`` true if the flag is true on any rank (set in
            ``on_train_start`` to the strategy's reduction), so that all ranks stop together
            instead of the others waiting forever in the next all-reduce. ``None``: one process.
    """

    def __init__(self, every: int = 25) -> None:
        self.every = max(1, every)
        self.any_rank: Callable[[bool], bool] | None = None
        self._first_bad: torch.Tensor | None = None  # () int64 on the loss's device; -1: none yet
        self._value: torch.Tensor | None = None  # the first non-finite value seen
        self._recent: deque[BatchInfo] = deque(maxlen=self.every)
        self._batch_at: tuple[int, int] = (0, 0)  # (step, epoch) of the running training batch

    # ---------------------------------------------------------------------------- Lightning hooks

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:
            strategy = trainer.strategy
            self.any_rank = lambda flag: strategy.reduce_boolean_decision(flag, all=False)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_at = (trainer.global_step, trainer.current_epoch)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Automatic optimisation hands over {"loss": detached loss, ...}; None: the step was skipped.
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        step, epoch = self._batch_at
        subjects = batch.get("subject", ()) if isinstance(batch, Mapping) else ()
        self.observe(loss, step=step, epoch=epoch, batch_idx=batch_idx, subjects=subjects)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check()

    # ---------------------------------------------------------------------------- the guard

    def observe(
        self, loss: torch.Tensor, *, step: int, epoch: int, batch_idx: int, subjects: Sequence[str] = ()
    ) -> None:
        """Record ``loss`` (a scalar) of one step; checks at once on a CPU (where looking costs
        nothing), else every ``every`` steps (or at :meth:`check`)."""
        self._recent.append(BatchInfo(step, epoch, batch_idx, tuple(str(s) for s in subjects)))
        loss = loss.detach()
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.int64, device=loss.device)
            self._value = torch.zeros((), dtype=loss.dtype, device=loss.device)
        bad = ~torch.isfinite(loss) & (self._first_bad < 0)
        # Python scalars only: a tensor made from `step` would be a host-to-device copy (and a
        # synchronisation) per step.
        self._first_bad = self._first_bad.masked_fill(bad, step)
        self._value = torch.where(bad, loss, self._value)
        if loss.device.type == "cpu" or (step + 1) % self.every == 0:
            self.check()

    def check(self) -> None:
        """Raise if any observed loss (on any rank) was not finite (one host synchronisation).

        Raises:
            NonFiniteError: naming the step, epoch, batch and subjects of the first such loss.
        """
        step = -1 if self._first_bad is None else int(self._first_bad)
        bad = step >= 0
        if self.any_rank is not None:
            bad = self.any_rank(bad)
        if not bad:
            return
        if step < 0:
            raise NonFiniteError("training loss became non-finite on another DDP rank; the stage stopped")
        self._raise(step, float(self._value))  # type: ignore[arg-type]

    def _raise(self, step: int, value: float) -> None:
        info = next((b for b in self._recent if b.step == step), None)
        where = f"step {step}"
        if info is not None:
            where = f"epoch {info.epoch + 1}, step {step} (batch {info.batch_idx} of the epoch"
            where += f"; subjects {', '.join(info.subjects)})" if info.subjects else ")"
        raise NonFiniteError(
            f"training loss became {value} at {where}; the stage stopped. The last good checkpoint "
            f"is the run's {LAST_CKPT} — lower optim.lr, or check those subjects' images"
        )
