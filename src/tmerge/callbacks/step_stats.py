"""Seconds per training step, the share of it the device waits between steps, peak memory.

What a fit's ``step_stats.json`` holds (``trainer.step_stats=true``): how fast the training loop
runs and whether the accelerator is kept busy, measured in the real stages rather than in a
benchmark.

Each training step is bracketed by two marks, one in ``on_train_batch_start`` (the batch has
been fetched and moved to the device) and one in ``on_train_batch_end`` (the optimiser step has
been issued). On a CUDA device the marks are CUDA events, so they are timed where the work
runs: *busy* is the device's time from a step's first to its last kernel, *wait* the device's
time from the end of one step to the start of the next within an epoch — the loader fetching the
next batch, its copy to the device and whatever the loop does in between — during which the
device has nothing of the training to run. With the host ahead of the device (an asynchronous
loop, a loader that keeps up) the wait is only the batch's copy. Events are read once the device
has passed them (``Event.query``), so the measurement adds no synchronisation to the loop; the
only waits are at the end of an epoch (where validation synchronises anyway) and of the fit. On
a CPU the marks are the host's clock, where the work runs too.

The first ``warmup`` steps of the fit (compilation, cuDNN autotuning, allocator growth) are
reported apart, not averaged in. Steps between epochs (validation, checkpoints) are never
counted as waits.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from tmerge.io import write_json

#: How many resolved steps between two rewrites of the file within an epoch.
WRITE_EVERY = 50


@dataclass
class _Step:
    """One training step's marks: device (CUDA events, or host seconds on CPU) and host clock."""

    start: torch.cuda.Event | float
    host_start: float
    end: torch.cuda.Event | float | None = None
    host_end: float | None = None


@dataclass
class _Totals:
    """The resolved steps of a fit (seconds)."""

    busy: list[float] = field(default_factory=list)  # per timed step
    wait: list[float] = field(default_factory=list)  # per timed step followed by one in its epoch
    cycle: list[float] = field(default_factory=list)  # busy + the wait after it, same steps as `wait`
    host_between: list[float] = field(default_factory=list)  # host time between the two hooks
    warmup: list[float] = field(default_factory=list)  # busy (+ wait) of the warm-up steps


class StepStats(Callback):
    """Write ``path`` (JSON) with the training loop's step time, device wait and peak memory.

    Written after every epoch, every :data:`WRITE_EVERY` resolved steps, at the end of the fit
    and when the fit is interrupted (SIGTERM, an error), so a cut run keeps what it measured.
    Only global rank 0 writes.

    Keys of the file: ``device``, ``clock`` (``"cuda events"`` or ``"host"``), ``epochs``,
    ``steps`` (timed steps), ``warmup_steps`` and ``warmup_s`` (their times, compilation
    included), ``s_per_step`` (mean of a step plus the wait after it), ``median_s_per_step``,
    ``busy_s`` (mean device time of a step), ``wait_s`` (mean wait between steps), ``wait_share``
    (total wait over total step-plus-wait time: the share of the loop's time the device waits),
    ``host_between_s`` (mean host time between the end of a step and the start of the next:
    loading included), ``peak_allocated_mib`` / ``peak_reserved_mib`` (CUDA, over the fit,
    validation and the end-of-training callbacks included) or ``peak_rss_mib`` (CPU: the
    process's peak resident set so far).

    Args:
        path: The JSON file.
        warmup: Steps at the start of the fit reported apart (compilation happens there).
    """

    def __init__(self, path: str | Path, warmup: int = 2) -> None:
        if warmup < 0:
            raise ValueError(f"StepStats: warmup must be >= 0, got {warmup}")
        self.path = Path(path)
        self.warmup = warmup
        self._pending: list[_Step] = []
        self._totals = _Totals()
        self._resolved = 0  # steps resolved in this fit (warm-up included)
        self._epochs = 0
        self._device: torch.device | None = None
        self._written_at = 0

    # ---------------------------------------------------------------- hooks

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._device = trainer.strategy.root_device
        self._pending, self._totals, self._resolved, self._epochs, self._written_at = [], _Totals(), 0, 0, 0
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self._device)

    @override
    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._pending.append(_Step(start=self._mark(), host_start=time.perf_counter()))

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._pending or self._pending[-1].end is not None:
            return  # a step whose start this fit did not see (cannot happen in Lightning's loop)
        step = self._pending[-1]
        step.end, step.host_end = self._mark(), time.perf_counter()
        self._resolve(epoch_over=False)
        if self._resolved - self._written_at >= WRITE_EVERY:
            self._write(trainer)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epochs += 1
        self._finish_epoch(trainer)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish_epoch(trainer)

    @override
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._pending = [s for s in self._pending if s.end is not None]  # a step cut mid-way
        try:
            self._finish_epoch(trainer)
        except RuntimeError:  # a device that failed (the exception being handled) cannot be read
            self._pending = []

    # ---------------------------------------------------------------- measuring

    @property
    def _cuda(self) -> bool:
        return self._device is not None and self._device.type == "cuda"

    def _mark(self) -> torch.cuda.Event | float:
        """A device mark now: a recorded CUDA event, or the host clock on other devices."""
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @staticmethod
    def _passed(mark: torch.cuda.Event | float | None) -> bool:
        """Whether the device has reached ``mark`` (never waits)."""
        if mark is None:
            return False
        return True if isinstance(mark, float) else bool(mark.query())

    @staticmethod
    def _seconds(a: torch.cuda.Event | float, b: torch.cuda.Event | float) -> float:
        if isinstance(a, float) and isinstance(b, float):
            return b - a
        assert isinstance(a, torch.cuda.Event) and isinstance(b, torch.cuda.Event)
        return a.elapsed_time(b) / 1000.0

    def _resolve(self, epoch_over: bool) -> None:
        """Move the steps the device has finished from ``_pending`` into the totals. A step's
        wait needs the next step's start; at the end of an epoch the last step has none."""
        while self._pending:
            step = self._pending[0]
            following = self._pending[1] if len(self._pending) > 1 else None
            if not self._passed(step.end):
                return
            if following is None and not epoch_over:
                return  # the wait after it is not known yet
            if following is not None and not self._passed(following.start):
                return
            self._pending.pop(0)
            assert step.end is not None
            busy = self._seconds(step.start, step.end)
            wait = None if following is None else self._seconds(step.end, following.start)
            self._add(busy, wait, step, following)

    def _add(self, busy: float, wait: float | None, step: _Step, following: _Step | None) -> None:
        self._resolved += 1
        t = self._totals
        if self._resolved <= self.warmup:
            t.warmup.append(busy + (wait or 0.0))
            return
        t.busy.append(busy)
        if wait is not None and following is not None and step.host_end is not None:
            t.wait.append(wait)
            t.cycle.append(busy + wait)
            t.host_between.append(following.host_start - step.host_end)

    def _finish_epoch(self, trainer: L.Trainer) -> None:
        """Wait for the device to pass the epoch's last mark, resolve everything, write."""
        last = self._pending[-1].end if self._pending else None
        if isinstance(last, torch.cuda.Event):
            last.synchronize()
        self._resolve(epoch_over=True)
        self._pending = []
        self._write(trainer)

    # ---------------------------------------------------------------- reporting

    def summary(self) -> dict[str, Any]:
        """What the file holds (see the class docstring), from the steps resolved so far."""
        t = self._totals

        def mean(values: list[float]) -> float | None:
            return sum(values) / len(values) if values else None

        out: dict[str, Any] = {
            "device": self._device_name(),
            "clock": "cuda events" if self._cuda else "host",
            "epochs": self._epochs,
            "steps": len(t.busy),
            "warmup_steps": len(t.warmup),
            "warmup_s": [round(v, 4) for v in t.warmup],
            "s_per_step": mean(t.cycle),
            "median_s_per_step": statistics.median(t.cycle) if t.cycle else None,
            "busy_s": mean(t.busy),
            "wait_s": mean(t.wait),
            "wait_share": sum(t.wait) / sum(t.cycle) if t.cycle and sum(t.cycle) > 0 else None,
            "host_between_s": mean(t.host_between),
        }
        if self._cuda:
            out["peak_allocated_mib"] = torch.cuda.max_memory_allocated(self._device) / 2**20
            out["peak_reserved_mib"] = torch.cuda.max_memory_reserved(self._device) / 2**20
        else:
            # ru_maxrss: KiB on Linux, bytes on macOS.
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            out["peak_rss_mib"] = peak / (2**20 if sys.platform == "darwin" else 2**10)
        return out

    def _device_name(self) -> str:
        if self._cuda:
            return torch.cuda.get_device_name(self._device)
        return str(self._device) if self._device is not None else "unknown"

    def _write(self, trainer: L.Trainer) -> None:
        self._written_at = self._resolved
        if trainer.is_global_zero:
            write_json(self.path, self.summary())
