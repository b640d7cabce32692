"""How the bench times and weighs a step: wall-clock seconds after warm-up, peak memory.

Timings are wall-clock (``time.perf_counter``) with one device synchronisation at each end of a
measurement, not per step: a per-step sync would hide the asynchrony the fast paths rely on.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously to the host)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rss_bytes() -> int | None:
    """The process's resident set in bytes (Linux ``/proc``); ``None`` where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class PeakMemory:
    """Peak memory during a ``with`` block, in MiB (:attr:`mib`; ``None`` where unknown).

    CUDA: ``torch.cuda.max_memory_allocated`` (reset on entry), i.e. the tensors' own bytes.
    CPU: the process's resident set, sampled every :attr:`interval_s` by a thread, so it includes
    the process's baseline; an allocation held for less than the interval may be missed. (There
    is no CPU counterpart of CUDA's peak counter: torch's CPU allocator keeps no statistics.)
    """

    interval_s = 0.005

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib: float | None = None
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif (start := rss_bytes()) is not None:
            self._peak = start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak = max(self._peak, rss_bytes() or 0)

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, rss_bytes() or 0)
            self.mib = self._peak / 2**20


def time_steps(step: Callable[[], Any], warmup: int, iters: int, device: torch.device) -> dict[str, Any]:
    """Run ``step`` ``warmup`` times untimed, then ``iters`` times timed.

    The warm-up absorbs one-off costs (compilation, cuDNN autotuning, allocator growth); its
    duration is reported separately because for a compiled step it *is* the compile time.

    Returns:
        ``{"s": seconds per timed step, "first_s": seconds of the whole warm-up, "peak_mib":
        peak memory of the timed steps}``.
    """
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm = time.perf_counter()
    with PeakMemory(device) as memory:
        begin = time.perf_counter()
        for _ in range(iters):
            step()
        sync(device)
        seconds = (time.perf_counter() - begin) / iters
    return {"s": seconds, "first_s": warm - start, "peak_mib": memory.mib}


class StepTimer(L.Callback):
    """Times a Lightning fit's training steps ``warmup … warmup + iters - 1``, data loading
    included: from the end of the last warm-up step (or the epoch's start, without warm-up) to
    the end of the last timed step, one device sync at each end.

    Attributes:
        seconds: Wall-clock seconds of the timed steps (0 until they have run).
        steps: How many steps were timed (``iters`` once they have run, else 0).
        peak_mib: Peak memory over the timed steps (:class:`PeakMemory`).
    """

    def __init__(self, warmup: int, iters: int, device: torch.device) -> None:
        self.warmup, self.iters, self.device = warmup, iters, device
        self.start: float | None = None
        self.seconds = 0.0
        self.steps = 0
        self.peak_mib: float | None = None
        self._memory: PeakMemory | None = None

    def _begin(self) -> None:
        sync(self.device)
        self._memory = PeakMemory(self.device).__enter__()
        self.start = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.warmup == 0:
            self._begin()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        done = trainer.global_step
        if done == self.warmup and self.warmup > 0:
            self._begin()
        elif self.start is not None and done == self.warmup + self.iters:
            sync(self.device)
            self.seconds = time.perf_counter() - self.start
            self.steps = self.iters
            assert self._memory is not None
            self._memory.__exit__(None, None, None)
            self.peak_mib = self._memory.mib
