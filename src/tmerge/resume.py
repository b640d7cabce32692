"""Surviving kills and pre-emption: resume points, RNG state in checkpoints, SIGTERM, run locks.

A training stage writes its newest checkpoint at every validation (Lightning's ``ModelCheckpoint``,
which saves atomically). Re-running the same command finds it and continues from it — epoch,
optimiser, LR scheduler, early-stopping and checkpoint-callback state are restored by Lightning,
the random generators by :class:`~tmerge.callbacks.RngState`. A finished ``fit`` leaves its
record (:data:`tmerge.runs.FIT_FILE`); a re-run after a kill that came later (during the
Fisher, the test or the next stage) skips training.

SIGTERM (what schedulers send before killing) is turned by Lightning into an exception at the
next batch boundary; :class:`~tmerge.callbacks.SaveOnSigterm` writes the newest checkpoint there and the
stage stops with :class:`~tmerge.errors.Interrupted` (exit status 143).

Two processes on one run folder would overwrite each other's checkpoints: :func:`run_lock`
holds an exclusive lock on ``<parent>/.<run>.lock`` (``filelock``: an ``flock`` where the file
system has it, a soft lock naming its holder elsewhere; a dead holder's lock is reclaimed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from tmerge.errors import RunError
from tmerge.runs import HPC_CKPT_GLOB, LAST_CKPT

log = logging.getLogger("tmerge")



def is_rank_zero() -> bool:
    """Whether this process is global rank 0 — true before any process group exists, and for
    the processes Lightning's DDP launcher or torchrun start with ``RANK``/``LOCAL_RANK`` > 0."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _lock_holder(lock_path: Path) -> tuple[str, str] | None:
    """``(pid, host)`` written at the top of a lock file (by us for ``flock`` locks, by
    ``filelock`` for its soft locks: both start with the pid and the host name), if any."""
    try:
        lines = lock_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    return (lines[0], lines[1]) if len(lines) >= 2 and lines[0].isdigit() else None


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` for the duration of a stage (rank 0 only: the other
    DDP ranks are this run's own processes).

    The lock is ``<parent>/.<run>.lock``, taken with ``filelock``: an ``flock`` where the file
    system supports it (released by the kernel when the process dies), and otherwise (some
    Lustre, GPFS and NFS mounts answer ENOSYS or EINVAL) a soft lock file that names its holder's
    pid and host, reclaimed once that process is gone. A lock left by a process that died is
    reclaimed with a message. If the stage left no run folder (it failed on its input before
    writing one), the lock file and the folders made for it are removed again.

    Raises:
        RunError: another process holds the lock, naming its pid and host.
    """
    if not is_rank_zero():
        yield
        return
    from filelock import FileLock, Timeout

    lock_path = run_dir.parent / f".{run_dir.name}.lock"
    made = [p for p in (lock_path.parent, *lock_path.parent.parents) if not p.exists()]
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    previous = _lock_holder(lock_path)
    lock = FileLock(lock_path, timeout=0, is_singleton=False, thread_local=False)
    try:
        with warnings.catch_warnings():
            # filelock warns when it falls back to a soft lock; the docstring says why that is fine.
            warnings.filterwarnings("ignore", message="flock not supported")
            lock.acquire()
    except Timeout:
        holder = _lock_holder(lock_path)
        who = f"pid {holder[0]} on {holder[1]}" if holder else "unknown process"
        raise RunError(
            f"{run_dir} is in use by another tmerge process ({who}, lock {lock_path}); "
            "wait for it to finish or stop it first"
        ) from None
    me = str(os.getpid())
    # A soft lock's file is filelock's own record, which already starts with our pid and host. An
    # flock leaves the file to us: empty, or the record of a holder that was killed before it
    # could clear it; either way we describe ourselves in it.
    native = (_lock_holder(lock_path) or ("",))[0] != me
    try:
        if previous is not None and previous[0] != me:
            log.info("%s: reclaimed a stale lock of pid %s on %s (that process is gone)", lock_path, *previous)
        if native:
            lock_path.write_text(f"{me}\n{platform.node()}\n")
        yield
    finally:
        if native and lock_path.is_file():
            lock_path.write_text("")  # a later holder must not take this process for a dead one
        if not run_dir.exists():  # nothing was written: leave nothing behind
            lock_path.unlink(missing_ok=True)  # before the release: no one else can hold it yet
        lock.release()
        if not run_dir.exists():
            for folder in made:  # innermost first
                with contextlib.suppress(OSError):
                    folder.rmdir()


def resume_point(run_dir: Path) -> Path | None:
    """The newest checkpoint a previous attempt left: :data:`~tmerge.runs.LAST_CKPT` (every
    validation) or one of Lightning's SLURM requeue checkpoints (:data:`~tmerge.runs.HPC_CKPT_GLOB`,
    written on SIGUSR1 before the job is requeued, usually mid-epoch and so newer); None if there
    is none."""
    found = [p for p in (run_dir / LAST_CKPT, *run_dir.glob(HPC_CKPT_GLOB)) if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


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
