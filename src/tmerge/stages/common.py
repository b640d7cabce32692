"""What every stage shares: run folders, seeding, exported weights, and the per-stage summary.

Run-folder protocol: ``config.yaml`` is written when a stage starts, artefacts are written
atomically as they are produced, and a stage's *marker* file (``metrics.json`` for source models,
``test_summary.json`` for target runs) is written last — a folder is finished only when its
marker exists. Re-running a finished stage skips it unless ``force=true``; a folder holding a
run made with a different config is refused rather than silently reused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import nn

from tmerge.config import config_hash, save_config
from tmerge.errors import ConfigError, RunError, TmergeError
from tmerge.io import file_sha256, read_json, write_json, write_safetensors
from tmerge.loggers import LoggerConfig
from tmerge.merge.imm import fisher_epsilon  # noqa: F401  (re-exported: the stages' ε of eq. 2)
from tmerge.modules.segmentation import LossConfig, OptimConfig, SegmentationModule
from tmerge.nets.config import NetConfig
from tmerge.resume import is_rank_zero, run_lock
from tmerge.runner import TrainerConfig, resolve_compile

log = logging.getLogger("tmerge")

#: Config keys that do not make a run different: ``force`` re-runs it, ``seed_folder`` only
#: says where its folder is.
IGNORED_KEYS = ("force", "seed_folder")

NET_FILE = "net.safetensors"
#: The initial weights θ₀ of a source trained from scratch (the base of every task vector τ = θ − θ₀).
INIT_FILE = "init.safetensors"
FISHER_FILE = "fisher.safetensors"
CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
#: A source run (task1, task2, all-hcp…) is finished when this exists (written last).
SOURCE_MARKER = "metrics.json"


def check_normalize(value: str) -> None:
    """Refuse a ``fisher.normalize`` that :func:`tmerge.fisher.normalize_fisher` does not know."""
    from tmerge.fisher import NORMALIZE

    if value not in NORMALIZE:
        raise ConfigError(f"fisher.normalize: expected one of {', '.join(NORMALIZE)}, got {value!r}")


@dataclass
class FisherConfig:
    """Empirical-Fisher settings for the source models (computed once, after training)."""

    max_samples: int | None = None  # None: every training volume (18 for a paper task)
    # How the saved Fisher is scaled: "none" keeps the raw mean of squared gradients; the merge
    # stages normalise at merge time (their own `fisher.normalize`), so raw files serve every
    # choice. "sum" | "l2" | "per_tensor": see tmerge.fisher.normalize_fisher.
    normalize: str = "none"
    method: str = "auto"  # "auto" | "loop" | "vmap" | "compile" — all give the same numbers

    def __post_init__(self) -> None:
        from tmerge.fisher import METHODS

        check_normalize(self.normalize)
        if self.method not in METHODS:
            raise ConfigError(f"fisher.method: expected one of {', '.join(METHODS)}, got {self.method!r}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(
                f"fisher.max_samples: got {self.max_samples}; expected a positive count or null"
            )


@dataclass
class MergeFisherConfig:
    """How the merge stages (imm, timm, forgetting) normalise the sources' Fishers before eq. 2."""

    # "per_tensor" (default): each model's Fisher tensor divided by its own sum, as the authors'
    # code did. Un-normalised ("none"), the two sources' Fishers differ per layer by factors of
    # 1 to 237 on the embedded data, so "uniform" IMM put a mean effective weight of 0.73 on M1.
    # "sum" | "l2": one global constant per model (see tmerge.fisher.normalize_fisher).
    normalize: str = "per_tensor"

    def __post_init__(self) -> None:
        check_normalize(self.normalize)


@dataclass
class RunConfig:
    """What every training stage's config holds; each stage adds its data and its own sections."""

    seed: int = 0  # training seed (initialisation, patch sampling); splits have data.seed
    force: bool = False  # run again even if the run folder holds a finished run
    runs_dir: str | None = None  # None: $TMERGE_RUNS or ./runs
    net: NetConfig = field(default_factory=NetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


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


def segmentation_module(
    net: nn.Module,
    dm: Any,
    cfg: RunConfig,
    patch_size: int,
    optim: OptimConfig | None = None,
    group_lrs: Mapping[str, float] | None = None,
) -> SegmentationModule:
    """The stage's LightningModule for ``net`` on ``dm``'s task, from the run config."""
    return SegmentationModule(
        net,
        output_mode=dm.output_mode,
        class_names=dm.class_names,
        patch_size=patch_size,
        optim=optim or cfg.optim,
        loss=cfg.loss,
        channels_last=cfg.net.channels_last,
        compile=resolve_compile(cfg.trainer.compile, cfg.trainer.accelerator),
        group_lrs=group_lrs,
    )


def head_names(net: nn.Module, specific: Sequence[str]) -> list[str]:
    """The task-specific parameters that belong to the segmentation heads (re-created for every
    new task, unlike the instance norms, which a transfer may keep)."""
    prefixes = tuple(getattr(net, "head_prefixes", ()))
    return [n for n in specific if prefixes and n.startswith(prefixes)]


def start_run(run_dir: Path, cfg: Any, marker: str, *, force: bool) -> bool:
    """Prepare ``run_dir`` for a stage; return ``False`` if it is finished and should be skipped.

    Call it holding :func:`stage_guard`. An unfinished folder of the same config is kept (its
    ``last.ckpt`` is resumed from); ``config.yaml`` and ``run.json`` (seed, git commit, command,
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

        old_hash = config_hash(OmegaConf.load(saved), ignore=IGNORED_KEYS)
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
    """``run.json``: what makes a run reproducible and traceable, one entry per attempt."""
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


def check_init_matches(base: Path) -> None:
    """Refuse a run folder's ``init.safetensors`` that is not the one its weights started from
    (the source stage records its hash beside the trained weights)."""
    net = base.parent / NET_FILE
    if base.name != INIT_FILE or not net.is_file():
        return
    recorded = load_net(net)[1].get("init_sha256")
    if recorded and file_sha256(base) != recorded:
        raise RunError(
            f"{base}: not the initial weights of {net} (its hash differs from the one recorded there)"
        )


def check_source_finished(path: Path, hint: str) -> None:
    """Refuse the weights ``path`` of a source run that has not finished (no ``metrics.json``
    beside them: killed during its Fisher, say) — its Fisher may be missing or stale.

    Raises:
        RunError: naming the run folder and how to finish it.
    """
    if not (path.parent / SOURCE_MARKER).is_file():
        raise RunError(
            f"source run {path.parent} is unfinished (no {SOURCE_MARKER}); re-run `{hint}` to finish it"
        )


def save_net(path: Path, net: nn.Module, meta: Mapping[str, Any]) -> Path:
    """Save the network's state dict to safetensors with its architecture in the metadata."""
    return write_safetensors(path, net.state_dict(), {"tmerge": json.dumps(dict(meta))})


def load_net(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a state dict and its architecture metadata written by :func:`save_net`.

    Raises:
        RunError: missing or unreadable file, naming it.
    """
    if not path.is_file():
        raise RunError(f"{path}: model weights not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {}).get("tmerge", "{}"))
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as exc:
        raise RunError(f"{path}: not a readable safetensors weight file ({exc})") from None


def check_architecture(
    path: Path, meta: Mapping[str, Any], expected: Mapping[str, Any], keys: tuple[str, ...]
) -> None:
    """Refuse weights whose architecture (``keys`` of the metadata) differs from ``expected``."""
    diffs = [
        f"{k}={meta.get(k)!r} (expected {expected.get(k)!r})" for k in keys if meta.get(k) != expected.get(k)
    ]
    if diffs:
        raise RunError(f"{path}: weights of another architecture: {', '.join(diffs)}")


def best_state_dict(ckpt_path: str, prefix: str = "net.") -> dict[str, torch.Tensor]:
    """The network's weights from a Lightning checkpoint (loaded with ``weights_only=True``)."""
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupted zip, refused pickle, …
        raise RunError(f"{ckpt_path}: not a readable checkpoint ({exc})") from None
    state = ckpt.get("state_dict", {})
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
