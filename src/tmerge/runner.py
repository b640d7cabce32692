"""One place that builds the Lightning Trainer, its loggers and callbacks, and fits a module.

A stage contributes only its LightningModule, its DataModule, its loggers
(:mod:`tmerge.loggers`), what to monitor and any extra callbacks (e.g. the Fisher callback);
checkpointing, early stopping and precision choices live here, once. The callbacks themselves are
in :mod:`tmerge.callbacks`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tmerge.callbacks import BestMetrics, EpochSummary, RngState, SaveOnSigterm, StopIfStopped
from tmerge.errors import ConfigError, Interrupted
from tmerge.io import read_json, write_json
from tmerge.resume import checkpoint_progress, resume_point
from tmerge.runs import BEST_CKPT, FIT_FILE

log = logging.getLogger("tmerge")

#: How a fit chooses the weights it returns: the best validation epoch (early stopping, the
#: paper's protocol) or the last epoch of a fixed budget (no validation).
SELECT = ("best", "last")

#: Written when a fit has finished: a re-run skips training (see :mod:`tmerge.resume`).


@dataclass
class TrainerConfig:
    """Lightning Trainer settings (anything here is passed through to ``L.Trainer``)."""

    accelerator: str = "auto"  # "cpu", "gpu", "auto"
    devices: Any = 1  # int, list of ids or "auto"; >1 with strategy=ddp for multi-GPU / multi-process
    num_nodes: int = 1  # multi-node under SLURM / torchrun
    strategy: str = "auto"  # "ddp" for several devices
    # "auto": bf16 autocast on GPUs (design §6: ~3x fp32 on an H100), fp32 on CPUs.
    precision: str = "auto"
    # torch.compile of the network for training and inference: "auto" = on with a CUDA GPU
    # (design §6: 0.090 → 0.040 s per step on an H100), off on CPUs (compiling takes minutes
    # there); "true" / "false". A failing compile falls back to eager with a warning.
    compile: str = "auto"
    max_epochs: int = 40  # upper bound; early stopping usually ends training first
    min_epochs: int = 1
    patience: int = 8  # early-stopping patience in validation checks
    limit_train_batches: float = 1.0  # a fraction (<=1.0) or a batch count (>1)
    limit_val_batches: float = 1.0
    check_val_every_n_epoch: int = 1
    log_every_n_steps: int = 10
    deterministic: bool = False  # True: deterministic algorithms (slower on GPU)
    # False: one summary line per epoch (readable in logs and under make); True: tqdm bars.
    progress_bar: bool = False


def quiet_lightning() -> None:
    """Lightning's INFO banners (GPU/TPU availability, tips, limits) drown the progress lines."""
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)


@dataclass
class FitResult:
    """What a finished ``fit`` reports for the stages' summaries (and its own record)."""

    best_path: str
    best_score: float | None
    monitor: str
    epochs: int
    best_epoch: int | None
    wall_s: float
    best_metrics: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def resolve_precision(precision: str, accelerator: str) -> str:
    """``"auto"`` → ``"bf16-mixed"`` when a CUDA GPU will be used, else ``"32-true"``."""
    if precision != "auto":
        return precision
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if gpu else "32-true"


def resolve_compile(compile: str | bool, accelerator: str) -> bool:
    """Whether to ``torch.compile`` the network: ``"auto"`` → when a CUDA GPU will be used.

    Args:
        compile: ``"auto"``, ``"true"`` or ``"false"`` (case-insensitive; a bool is taken as is,
            and a YAML ``true`` arrives as ``"True"``).
        accelerator: The trainer's accelerator (``"auto"``, ``"gpu"``, ``"cuda"``, ``"cpu"``, …).

    Raises:
        ConfigError: Another value, naming ``trainer.compile``.
    """
    if isinstance(compile, bool):
        return compile
    value = str(compile).strip().lower()
    if value == "auto":
        return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if value in ("true", "false"):
        return value == "true"
    raise ConfigError(f"trainer.compile: expected 'auto', 'true' or 'false', got {compile!r}")


def fit(
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    *,
    run_dir: Path,
    trainer_cfg: TrainerConfig,
    loggers: Sequence[Logger] = (),
    monitor: str = "val/dice",
    mode: str = "max",
    callbacks: Sequence[Callback] = (),
    name: str = "",
    max_epochs: int | None = None,
    patience: int | None = None,
    select: str = "best",
) -> tuple[L.Trainer, FitResult]:
    """Fit ``module`` with checkpointing (:data:`~tmerge.runs.BEST_CKPT` best, ``LAST_CKPT`` every
    validation) and early stopping on ``monitor``.

    ``select="last"`` (the fixed protocol) trains exactly ``max_epochs`` without validating:
    no early stopping, no selection, and :data:`~tmerge.runs.BEST_CKPT` holds the final weights;
    the validation split is never read.

    Resumable (see :mod:`tmerge.resume`): the checkpoint a killed attempt left is resumed
    from; a finished fit (``FIT_FILE``) is not repeated — its result is returned with a fresh
    trainer, ready for ``trainer.test(ckpt_path=result.best_path)``.

    Returns:
        The trainer (for ``trainer.test`` and callbacks) and a :class:`FitResult`.

    Raises:
        Interrupted: SIGTERM arrived; the newest checkpoint was written first.
        RunError: that checkpoint cannot be loaded (truncated, not a checkpoint, unsafe pickle).
    """
    if select not in SELECT:
        raise ValueError(f"fit: select must be one of {SELECT}, got {select!r}")
    fixed = select == "last"
    label = name or run_dir.name
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = ModelCheckpoint(
        dirpath=run_dir,
        filename=BEST_CKPT.removesuffix(".ckpt"),  # Lightning adds the suffix
        monitor=None if fixed else monitor,  # None: the newest epoch's weights
        mode=mode,
        save_last=True,
        enable_version_counter=False,
    )
    stoppers: list[Callback] = []
    if not fixed:
        stopper = EarlyStopping(monitor=monitor, mode=mode, patience=patience or trainer_cfg.patience)
        stoppers = [stopper, StopIfStopped(stopper)]
    best = BestMetrics(checkpoint)
    sigterm = SaveOnSigterm(run_dir)
    quiet_lightning()
    progress: list[Callback] = [] if trainer_cfg.progress_bar else [EpochSummary(label, monitor, mode)]
    trainer = L.Trainer(
        default_root_dir=str(run_dir),
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        num_nodes=trainer_cfg.num_nodes,
        strategy=trainer_cfg.strategy,
        precision=resolve_precision(trainer_cfg.precision, trainer_cfg.accelerator),
        max_epochs=max_epochs or trainer_cfg.max_epochs,
        min_epochs=trainer_cfg.min_epochs,
        limit_train_batches=_count_or_fraction(trainer_cfg.limit_train_batches),
        limit_val_batches=0 if fixed else _count_or_fraction(trainer_cfg.limit_val_batches),
        num_sanity_val_steps=0 if fixed else None,
        check_val_every_n_epoch=trainer_cfg.check_val_every_n_epoch,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        deterministic=trainer_cfg.deterministic,
        enable_progress_bar=trainer_cfg.progress_bar,
        enable_model_summary=False,
        logger=list(loggers) or False,
        callbacks=[best, checkpoint, *stoppers, RngState(), sigterm, *progress, *callbacks],
    )
    done = run_dir / FIT_FILE
    if done.is_file():
        log.info("%s: already trained (%s); continuing after training", label, done)
        result = FitResult(**read_json(done))
        last = resume_point(run_dir)
        if not result.best_path and last is not None:
            # No monitored validation ran, so no best checkpoint: the module here is freshly
            # initialised, and the trained weights are those of the last checkpoint.
            result.best_path = str(last)
        return trainer, result
    resume = resume_point(run_dir)
    if resume is not None:
        epoch, step = checkpoint_progress(resume)
        log.info("%s: resuming from %s (saved in epoch %d, after step %d)", label, resume, epoch + 1, step)
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    except SIGTERMException:
        where = f"; {sigterm.path} saved" if sigterm.saved else ""
        raise Interrupted(f"{label}: stopped by SIGTERM{where}; run the same command again to resume") from None
    wall = time.perf_counter() - start
    best_score = checkpoint.best_model_score
    result = FitResult(
        best_path=checkpoint.best_model_path,
        best_score=None if best_score is None else float(best_score),
        monitor=monitor,
        epochs=trainer.current_epoch,
        best_epoch=int(best.metrics["epoch"]) if "epoch" in best.metrics else None,
        wall_s=round(wall + best.previous_wall_s, 2),
        best_metrics={k: v for k, v in best.metrics.items() if k != "epoch"},
    )
    if trainer.is_global_zero:
        write_json(done, result.as_dict())
    return trainer, result


def _count_or_fraction(value: float) -> float | int:
    return int(value) if value > 1 else float(value)
