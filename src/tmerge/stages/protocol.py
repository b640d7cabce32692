"""The run protocol every stage follows on its folder (layout: :mod:`tmerge.runs`).

The config is written when a stage starts, artefacts are written atomically as they are
produced, and the stage's *marker* is written last — a folder is finished only when its marker
exists. Re-running a finished stage skips it unless ``force=true``; a folder holding a run made
with a different config is refused rather than silently reused. A stage holds an exclusive lock
on its folder, and a folder it created is removed again if it fails on the user's input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tmerge.config import config_hash, save_config
from tmerge.errors import RunError, TmergeError
from tmerge.io import read_json, write_json
from tmerge.resume import is_rank_zero, run_lock
from tmerge.runs import CONFIG_FILE, RUN_FILE

#: Config keys that do not make a run different: ``force`` re-runs it, ``seed_folder`` only
#: says where its folder is.
IGNORED_KEYS = ("force", "seed_folder")


@contextlib.contextmanager
def discard_on_input_error(run_dir: Path) -> Iterator[None]:
    """Remove ``run_dir`` again if it did not exist before and the stage fails on the user's
    input (a :class:`~tmerge.errors.TmergeError`, e.g. a truncated NIfTI met while
    preprocessing): such a folder holds nothing worth keeping. Other failures (a crash, a kill)
    keep it, with its checkpoints, for inspection and resuming."""
    existed = run_dir.exists()
    try:
        yield
    except TmergeError as exc:
        # A folder with checkpoints holds training worth keeping whatever failed afterwards.
        if not existed and exc.input_error and not any(run_dir.glob("*.ckpt")):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def start_run(run_dir: Path, cfg: Any, marker: str, *, force: bool) -> bool:
    """Prepare ``run_dir`` for a stage; return ``False`` if it is finished and should be skipped.

    Call it holding :func:`stage_guard`. An unfinished folder of the same config is kept (its
    newest checkpoint is resumed from); the config and the run record (seed, git commit, command,
    versions, attempts) are written. Only global rank 0 prepares: the other DDP ranks are this
    run's own processes, started after rank 0 got here.

    Raises:
        RunError: the folder holds an (unfinished or finished) run of a *different* config and
            ``force`` is not set.
    """
    if not is_rank_zero():
        # Ranks > 0 re-run the command from the top (Lightning's DDP launcher): they must skip
        # exactly the runs rank 0 skipped — finished ones — or a sweep's collectives mismatch.
        # With force, rank 0 reruns everything (and may not have removed the marker yet).
        return force or not (run_dir / marker).is_file()
    cfg_hash = config_hash(cfg, ignore=IGNORED_KEYS)
    saved = run_dir / CONFIG_FILE
    if run_dir.exists() and force:
        shutil.rmtree(run_dir)
    elif saved.is_file():
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        old = OmegaConf.load(saved)
        if dataclasses.is_dataclass(cfg):
            # Keys added to the config since that run was made take their defaults, so a
            # finished run of an older version is still recognised (and skipped) when nothing
            # it was made with has changed; keys it has that the schema lost make it differ.
            with contextlib.suppress(OmegaConfBaseException):
                old = OmegaConf.merge(OmegaConf.structured(type(cfg)), old)
        old_hash = config_hash(old, ignore=IGNORED_KEYS)
        if old_hash != cfg_hash:
            raise RunError(
                f"{run_dir} holds a run made with a different config (see {saved}); "
                "pass force=true to overwrite it, or choose another runs_dir"
            )
        if (run_dir / marker).is_file():
            return False
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, saved)
    _record_run(run_dir / RUN_FILE, cfg)
    return True


@contextlib.contextmanager
def stage_guard(run_dir: Path) -> Iterator[None]:
    """What surrounds every stage's work on ``run_dir``: an exclusive lock (a second process on
    the same folder is refused) and removal of a folder this stage created if it then fails on
    the user's input (see :func:`discard_on_input_error`)."""
    with run_lock(run_dir), discard_on_input_error(run_dir):
        yield


def _record_run(path: Path, cfg: Any) -> None:
    """The run record: what makes a run reproducible and traceable, one entry per attempt."""
    import platform
    import sys
    from datetime import datetime, timezone

    import lightning

    previous = read_json(path) if path.is_file() else {}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    commit, dirty = git_commit()
    write_json(
        path,
        {
            "seed": getattr(cfg, "seed", None),
            "config_hash": config_hash(cfg, ignore=IGNORED_KEYS),
            "commit": commit,
            "dirty": dirty,
            "started": previous.get("started", now),
            "attempts": [*previous.get("attempts", []), {"at": now, "command": sys.argv, "commit": commit}],
            "host": platform.node(),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "lightning": lightning.__version__,
            },
        },
    )


def git_commit() -> tuple[str | None, bool | None]:
    """The commit of the tmerge source tree and whether it has uncommitted changes; ``(None,
    None)`` outside a git checkout (e.g. an installed wheel)."""
    import subprocess

    root = Path(__file__).resolve().parents[3]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None, None
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None
