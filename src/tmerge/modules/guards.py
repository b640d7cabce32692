"""Stopping a stage when its training loss stops being a number, without stalling the GPU.

Checking ``torch.isfinite(loss)`` on the host every step forces a device synchronisation per
step. :class:`NonFiniteGuard` instead keeps, on the loss's device, the first step whose loss was
not finite, and looks at it every ``every`` steps (every step on a CPU, where looking is free).
It remembers the last few batches (step, epoch, batch index, subjects) on the host, so the error
still names the batch that failed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tmerge.errors import NonFiniteError


@dataclass(frozen=True)
class BatchInfo:
    step: int
    epoch: int
    batch_idx: int
    subjects: tuple[str, ...]


class NonFiniteGuard:
    """Watches training losses; :meth:`check` raises :class:`~tmerge.errors.NonFiniteError`.

    Args:
        every: host checks on an accelerator every ``every`` steps (CPU: every step).

    Attributes:
        any_rank: Under DDP, ``flag -> bool`` true if the flag is true on any rank (the stage sets
            it to its strategy's reduction), so that all ranks stop together instead of the others
            waiting forever in the next all-reduce. ``None``: one process.
    """

    def __init__(self, every: int = 25) -> None:
        self.every = max(1, every)
        self.any_rank: Callable[[bool], bool] | None = None
        self._first_bad: torch.Tensor | None = None  # () int64 on the loss's device; -1: none yet
        self._value: torch.Tensor | None = None  # the first non-finite value seen
        self._recent: deque[BatchInfo] = deque(maxlen=self.every)

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
        """Raise if any observed loss (on any rank) was not finite (one host synchronisation)."""
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
            "is the run's last.ckpt — lower optim.lr, or check those subjects' images"
        )
