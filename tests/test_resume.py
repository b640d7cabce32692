"""Run locks on every file system: flock where it works, a soft lock naming its holder where it
does not (some Lustre/GPFS/NFS mounts), stale locks of dead processes reclaimed with a message."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import platform
import signal
import subprocess
import sys
import time

import pytest

from tmerge.errors import RunError
from tmerge.resume import run_lock


def broken_flock(fd: int, operation: int) -> None:
    raise OSError(errno.ENOSYS, "Function not implemented")


@pytest.fixture
def no_flock(monkeypatch):
    """A file system without flock: every flock call fails with ENOSYS."""
    monkeypatch.setattr(fcntl, "flock", broken_flock)


def holder_message() -> str:
    return f"pid {os.getpid()} on {platform.node()}"


def test_flock_lock_is_exclusive_names_its_holder_and_is_released(tmp_path):
    run = tmp_path / "runs" / "task1"
    with run_lock(run):
        run.mkdir()
        with pytest.raises(RunError, match=f"in use by another tmerge process \\({holder_message()}"):
            with run_lock(run):
                pass
    with run_lock(run):  # released
        pass


def test_soft_lock_where_flock_is_unsupported(tmp_path, no_flock):
    run = tmp_path / "runs" / "task1"
    with run_lock(run):
        run.mkdir()
        lock = tmp_path / "runs" / ".task1.lock"
        assert lock.read_text().splitlines()[0] == str(os.getpid())  # the soft lock names its holder
        with pytest.raises(RunError, match=f"pid {os.getpid()} on "):
            with run_lock(run):
                pass
    with run_lock(run):
        pass


# A holder as run_lock leaves it, without importing tmerge (and torch) in the child: an flock with
# "pid\nhost" in the file, or filelock's soft lock (whose record starts the same way).
HOLD = """
import errno, fcntl, os, platform, sys, time, warnings
from pathlib import Path
warnings.simplefilter("ignore")
if sys.argv[2] == "soft":
    def broken(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")
    fcntl.flock = broken
from filelock import FileLock
run = Path(sys.argv[1])
lock_path = run.parent / f".{run.name}.lock"
lock_path.parent.mkdir(parents=True, exist_ok=True)
lock = FileLock(lock_path, timeout=0)
lock.acquire()
if lock_path.stat().st_size == 0:
    lock_path.write_text(f"{os.getpid()}\\n{platform.node()}\\n")
run.mkdir(parents=True, exist_ok=True)
print("held", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("mode", ["flock", "soft"])
def test_a_dead_holders_lock_is_reclaimed_with_a_message(tmp_path, caplog, mode, monkeypatch):
    run = tmp_path / "runs" / "task1"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run), mode], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        if mode == "soft":
            monkeypatch.setattr(fcntl, "flock", broken_flock)
        with pytest.raises(RunError, match=f"pid {proc.pid} on "):  # alive: refused
            with run_lock(run):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    time.sleep(0.1)
    lock = run.parent / ".task1.lock"
    with caplog.at_level(logging.INFO, logger="tmerge"), run_lock(run):
        # The file now names this process, so a contender is told the live holder.
        assert lock.read_text().splitlines()[0] == str(os.getpid())
    assert f"reclaimed a stale lock of pid {proc.pid}" in caplog.text
    if mode == "flock":
        assert lock.read_text() == ""  # cleared on release: no dead holder left behind
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tmerge"), run_lock(run):
        pass
    assert "reclaimed" not in caplog.text  # nothing stale the second time


def test_a_stage_that_wrote_nothing_leaves_no_lock_or_folders(tmp_path):
    run = tmp_path / "runs" / "brats" / "p8" / "timm"
    with pytest.raises(ValueError):
        with run_lock(run):
            raise ValueError("bad input before anything was written")
    assert not (tmp_path / "runs").exists()
    with run_lock(run):  # a stage that made its folder keeps it (and the empty lock file)
        run.mkdir(parents=True)
    assert run.is_dir() and (run.parent / ".timm.lock").read_text() == ""


def test_resume_point_is_the_newest_of_last_and_slurm_requeue_checkpoints(tmp_path):
    from tmerge.resume import resume_point

    assert resume_point(tmp_path) is None
    last, hpc1, hpc2 = tmp_path / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt", tmp_path / "hpc_ckpt_2.ckpt"
    for i, path in enumerate((hpc1, last, hpc2)):  # written in this order
        path.write_bytes(b"x")
        os.utime(path, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))
    assert resume_point(tmp_path) == hpc2
    os.utime(last, ns=(2 * 10**18, 2 * 10**18))  # a later validation wrote last.ckpt again
    assert resume_point(tmp_path) == last
