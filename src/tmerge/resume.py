"""Surviving kills and pre-emption: resume points, RNG state in checkpoints, SIGTERM, run locks.

A training stage writes ``last.ckpt`` at every validation (Lightning's ``ModelCheckpoint``,
which saves atomically). Re-running the same command finds it and continues from it — epoch,
optimiser, LR scheduler, early-stopping and checkpoint-callback state are restored by Lightning,
the random generators by :class:`RngState`. A finished ``fit`` leaves ``fit.json``; a re-run
after a kill that came later (during the Fisher, the test or the next stage) skips training.

SIGTERM (what schedulers send before killing) is turned by Lightning into an exception at the
next batch boundary; :class:`SaveOnSigterm` writes ``last.ckpt`` there and the stage stops with
:class:`~tmerge.errors.Interrupted` (exit status 143).

Two processes on one run folder would overwrite each other's checkpoints: :func:`run_lock`
holds an exclusive ``flock`` on ``<parent>/.<run>.lock`` (released by the kernel when the
process dies, so a killed run never leaves a stale lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tmerge.errors import RunError

log = logging.getLogger("tmerge")

LAST_CKPT = "last.ckpt"


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 — true before any process group exists, and for
    the processes Lightning's DDP launcher or torchrun start with ``RANK``/``LOCAL_RANK`` > 0."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` for the duration of a stage (rank 0 only: the other
    DDP ranks are this run's own processes).

    Raises:
        RunError: another process holds the lock, naming its pid.
    """
    if not is_rank_zero():
        yield
        return
    lock_path = run_dir.parent / f".{run_dir.name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunError(
                f"{run_dir} is in use by another tmerge process (pid {holder}, lock {lock_path}); "
                "wait for it to finish or stop it first"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def resume_point(run_dir: Path) -> Path | None:
    """``run_dir/last.ckpt`` if a previous attempt left one."""
    path = run_dir / LAST_CKPT
    return path if path.is_file() else None


def checkpoint_progress(path: Path) -> tuple[int, int]:
    """``(epoch, global_step)`` of a Lightning checkpoint: the (0-based) epoch it was saved in
    and the optimiser steps done. Loaded with ``weights_only=True``.

    Raises:
        RunError: the file is truncated, not a checkpoint, or holds objects that are refused
            (anything but tensors and plain containers — e.g. a pickle with ``__reduce__``).
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, refused global, …
        raise RunError(
            f"{path}: cannot resume from this checkpoint ({_first_line(exc)}); "
            "delete it to start the stage afresh, or pass force=true"
        ) from None
    if not isinstance(ckpt, dict) or "epoch" not in ckpt:
        raise RunError(f"{path}: not a Lightning checkpoint (no 'epoch'); delete it or pass force=true")
    return int(ckpt["epoch"]), int(ckpt.get("global_step", 0))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class RngState(Callback):
    """Carries the Python, NumPy and torch generators through a checkpoint, so a resumed run
    draws the patches and dropout masks it would have drawn (Lightning saves loops, optimisers
    and callbacks, not the generators). Stored as tensors and ints: loadable with
    ``weights_only=True``."""

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        py_version, py_state, py_gauss = random.getstate()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "numpy_pos": int(np_state[2]),
            "python": [py_version, list(py_state), py_gauss],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        keys = state["numpy_keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
        version, py_state, gauss = state["python"]
        random.setstate((version, tuple(py_state), gauss))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class SaveOnSigterm(Callback):
    """On SIGTERM (raised by Lightning at the next batch boundary), write ``last.ckpt`` so that
    the re-run resumes from the current step rather than the last epoch end."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LAST_CKPT
        self.saved = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            trainer.save_checkpoint(self.path)  # every rank calls it; rank 0 writes, atomically
            self.saved = True
