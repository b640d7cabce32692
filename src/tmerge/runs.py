"""The run-folder contract: the name of every file a stage writes, and how they are read back.

Every artefact's name is spelt here and nowhere else; stages, the forgetting table, the report
and W&B artifacts import it. Layout::

    <runs>/<name>/                          a source run (task1, task2, all-hcp, …)
        config.yaml, run.json               written when the stage starts (config, commit, attempts)
        init.safetensors                    θ₀: the weights a run from scratch started from
        model.ckpt, last.ckpt, fit.json     best and newest checkpoint; the finished fit
        step_stats.json                     trainer.step_stats=true: step time, device wait, memory
        hpc_ckpt_<k>.ckpt                   Lightning's SLURM requeue checkpoints
        net.safetensors, fisher.safetensors the best weights (architecture and hashes in the
                                            metadata) and their empirical Fisher
        logs/metrics.csv                    the CSV log
        metrics.json                        the marker: written last, the run is finished
    <runs>/brats/p<portion>/[seed<k>/]<init>/   a target run (seed<k>/: a sweep over seeds)
        config.yaml, run.json, splits.json  as above; the subjects of train/val/test
        selection/<i>/, selection.json      task-vector grids: one adaption of S per candidate
        adaption/, alphas.json              T-IMM: the adaption stage and its α (trajectory)
        model.ckpt, last.ckpt, fit.json     the fine-tune
        stages.json, net.safetensors        epochs and scores per stage; the best weights
        predictions/<subject>.nii.gz        label maps in the subjects' own geometry
        predictions/validation/<id>.nii.gz  100 %: the unlabelled set, submission naming
        test_per_subject.csv                Dice and HD95 per subject and region
        test_summary.json                   the marker, written last
    <runs>/forgetting/p<portion>/           table4.json, table4.md, examples.npz (paper Table 4)
    <runs>/artifacts/<entity>/<project>/<name>/<version>/   the W&B artifact cache
    <runs>/wandb/                           W&B runs (offline by default)

A folder is finished exactly when its marker exists (:func:`is_finished`); readers ignore
unfinished folders. Formats of the score files: :mod:`tmerge.evaluate`. A leaf: the checks of a
source model read through these names are :mod:`tmerge.sources`'.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from torch import nn

from tmerge.errors import RunError
from tmerge.io import write_safetensors

# --- every stage ------------------------------------------------------------------------------
CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
FIT_FILE = "fit.json"
#: Seconds per training step, the device's wait between steps, peak memory (trainer.step_stats).
STEP_STATS_FILE = "step_stats.json"
BEST_CKPT = "model.ckpt"
LAST_CKPT = "last.ckpt"
HPC_CKPT_GLOB = "hpc_ckpt_*.ckpt"
LOGS_DIR = "logs"
#: Lightning's CSV log in ``logs/`` (its own name); earlier attempts are kept beside it.
METRICS_CSV = "metrics.csv"
SPLITS_FILE = "splits.json"
# --- source runs ------------------------------------------------------------------------------
NET_FILE = "net.safetensors"
#: The initial weights θ₀ of a source trained from scratch (the base of every task vector τ = θ − θ₀).
INIT_FILE = "init.safetensors"
FISHER_FILE = "fisher.safetensors"
#: A source run is finished when this exists (written last).
SOURCE_MARKER = "metrics.json"
# --- target runs ------------------------------------------------------------------------------
STAGES_FILE = "stages.json"
ALPHAS_FILE = "alphas.json"
SELECTION_FILE = "selection.json"
SELECTION_DIR = "selection"
ADAPTION_DIR = "adaption"
WARMUP_DIR = "warmup"  # the fixed protocol's S warm-up (P frozen)
PER_SUBJECT_FILE = "test_per_subject.csv"
#: Per test subject, the voxels of each class in the truth and the prediction:
#: ``subject,truth_<c>…,pred_<c>…`` (:func:`tmerge.evaluate.regions_csv`); optional.
REGIONS_FILE = "test_regions.csv"
#: Test scores after log-spaced epochs (:class:`tmerge.callbacks.LearningCurve`); optional.
CURVE_FILE = "curve.json"
#: A target run's target: name, kind, channels, label scheme and mapping (tmerge predict reads it
#: where the dataset root is not there).
TARGET_FILE = "target.json"
#: A target run is finished when this exists (written last).
TARGET_MARKER = "test_summary.json"
#: Label maps of the test subjects, in their original geometry.
PREDICTIONS_DIR = "predictions"
#: Under ``predictions/``: the unlabelled validation set (portion 100), named ``<ID>.nii.gz``.
VALIDATION_DIR = "validation"
# --- forgetting (Table 4) ---------------------------------------------------------------------
FORGETTING_DIR = "forgetting"
FORGETTING_TABLE = "table4.json"
FORGETTING_MD = "table4.md"
FORGETTING_EXAMPLES = "examples.npz"
# --- the runs root ----------------------------------------------------------------------------
TARGETS_DIR = "brats"
#: Targets other than BraTS: ``<runs>/targets/<target name>/p<portion>/…``.
OTHER_TARGETS_DIR = "targets"
ARTIFACTS_DIR = "artifacts"
WANDB_DIR = "wandb"
#: Top-level folders of the runs root that are not source runs.
NOT_SOURCES = frozenset(
    {TARGETS_DIR, OTHER_TARGETS_DIR, FORGETTING_DIR, "report", WANDB_DIR, ARTIFACTS_DIR, "lightning_logs", "bench"}
)


def is_finished(run_dir: Path, marker: str) -> bool:
    """Whether ``run_dir`` holds a finished run (its ``marker`` was written, last)."""
    return (run_dir / marker).is_file()


def target_root(runs_root: Path, target: str = TARGETS_DIR) -> Path:
    """The folder of one target's runs: ``<runs>/brats`` for BraTS, ``<runs>/targets/<target>``
    for any other dataset."""
    return runs_root / TARGETS_DIR if target == TARGETS_DIR else runs_root / OTHER_TARGETS_DIR / target


def target_roots(runs_root: Path) -> dict[str, Path]:
    """Every target with a run folder: name → :func:`target_root` (BraTS first, others by name)."""
    found = {TARGETS_DIR: runs_root / TARGETS_DIR} if (runs_root / TARGETS_DIR).is_dir() else {}
    others = runs_root / OTHER_TARGETS_DIR
    if others.is_dir():
        found.update({d.name: d for d in sorted(others.iterdir()) if d.is_dir() and not d.name.startswith(".")})
    return found


def target_dir(
    runs_root: Path, portion: int, init: str, seed: int | None = None, target: str = TARGETS_DIR
) -> Path:
    """``<runs>/brats/p<portion>/<init>`` (another target: ``<runs>/targets/<target>/p<portion>/<init>``),
    or ``…/seed<seed>/<init>`` for a per-seed layout."""
    base = target_root(runs_root, target) / f"p{portion}"
    return base / init if seed is None else base / f"seed{seed}" / init


def forgetting_dir(runs_root: Path, portion: int) -> Path:
    """``<runs>/forgetting/p<portion>``: Table 4 of that portion's T-IMM α."""
    return runs_root / FORGETTING_DIR / f"p{portion}"


# --- weights -------------------------------------------------------------------------------------
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


def best_state_dict(ckpt_path: str | Path, prefix: str = "net.") -> dict[str, torch.Tensor]:
    """The network's weights from a Lightning checkpoint (loaded with ``weights_only=True``).

    Raises:
        RunError: the file is not a readable checkpoint, naming it.
    """
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupted zip, refused pickle, …
        raise RunError(f"{ckpt_path}: not a readable checkpoint ({exc})") from None
    state = ckpt.get("state_dict", {})
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_fisher(path: Path) -> dict[str, torch.Tensor]:
    """Read a Fisher written by :class:`~tmerge.callbacks.FisherCallback`: ``{name: F}`` as float32
    CPU tensors, in the file's (sorted) order. What it must hold: :func:`tmerge.fisher.fisher_problem`.

    Raises:
        RunError: missing or unreadable file, naming it.
    """
    if not path.is_file():
        raise RunError(
            f"{path}: Fisher file not found (it is written by FisherCallback at the end of training)"
        )
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise RunError(f"{path}: not a readable safetensors Fisher file ({exc})") from None
    return {n: t.float() for n, t in tensors.items()}
