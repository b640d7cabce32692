"""Stopping a stage when its training loss stops being a number, without stalling the GPU.

Checking ``torch.isfinite(loss)`` on the host every step forces a device synchronisation per
step. :class:`NonFiniteGuard` instead keeps, on the loss's device, the first step whose loss was
not finite, and looks at it every ``every`` steps (every step on a CPU, where looking is free).
It remembers the last few batches (step, epoch, batch index, subjects) on the host, so the error
still names the batch that failed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
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
    """

    def __init__(self, every: int = 25) -> None:
        self.every = max(1, every)
        self._first_bad: torch.Tensor | None = None  # () int64 on the loss's device; -1: none yet
        self._value: torch.Tensor | None = None  # the first non-finite value seen
        self._recent: deque[BatchInfo] = deque(maxlen=self.every)

    def observe(
        self, loss: torch.Tensor, *, step: int, epoch: int, batch_idx: int, subjects: Sequence[str] = ()
    ) -> None:
        """Record ``loss`` (a scalar) of one step; raises at once on a CPU, else every ``every``
        steps (or at :meth:`check`)."""
        self._recent.append(BatchInfo(step, epoch, batch_idx, tuple(str(s) for s in subjects)))
        loss = loss.detach()
        if loss.device.type == "cpu":
            if not bool(torch.isfinite(loss)):
                self._raise(step, float(loss))
            return
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.int64, device=loss.device)
            self._value = torch.zeros((), dtype=loss.dtype, device=loss.device)
        bad = ~torch.isfinite(loss) & (self._first_bad < 0)
        self._first_bad = torch.where(bad, torch.as_tensor(step, device=loss.device), self._first_bad)
        self._value = torch.where(bad, loss, self._value)
        if (step + 1) % self.every == 0:
            self.check()

    def check(self) -> None:
        """Raise if any observed loss was not finite (one host synchronisation)."""
        if self._first_bad is None:
            return
        step = int(self._first_bad)
        if step >= 0:
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
