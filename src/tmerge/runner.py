"""One place that builds the Lightning Trainer, its loggers and callbacks, and fits a module.

A stage contributes only its LightningModule, its DataModule, its loggers
(:mod:`tmerge.loggers`), what to monitor and any extra callbacks (e.g. the Fisher callback);
checkpointing, early stopping and precision choices live here, once. The callbacks themselves are
in :mod:`tmerge.callbacks`.

One file of ~450 lines on purpose: the Trainer's settings (precision, compile, devices,
resume, checkpoints) depend on each other, and keeping their resolution beside the one
``fit`` that uses them is what lets a stage not know about any of them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from tmerge.callbacks import BestMetrics, EpochSummary, RngState, SaveOnSigterm, StepStats, StopIfStopped
from tmerge.config import check_count
from tmerge.errors import ConfigError, Interrupted
from tmerge.io import read_json, write_json
from tmerge.resume import checkpoint_progress, resume_point
from tmerge.runs import BEST_CKPT, FIT_FILE, STEP_STATS_FILE

log = logging.getLogger("tmerge")

#: How a fit chooses the weights it returns: the best validation epoch (early stopping, the
#: paper's protocol) or the last epoch of a fixed budget (no validation).
SELECT = ("best", "last")


@dataclass
class TrainerConfig:
    """Lightning Trainer settings (anything here is passed through to ``L.Trainer``)."""

    accelerator: str = "auto"  # "cpu", "gpu", "auto"
    devices: Any = 1  # int, list of ids or "auto"; >1 with strategy=ddp for multi-GPU / multi-process
    num_nodes: int = 1  # multi-node under SLURM / torchrun
    strategy: str = "auto"  # "ddp" for several devices
    # "auto": bf16 autocast on GPUs (~3x fp32 on an H100, docs/benchmarks.md), fp32 on CPUs.
    precision: str = "auto"
    # torch.compile of the network for training and inference: "auto" = on with a CUDA GPU
    # (docs/benchmarks.md: 0.090 → 0.040 s per step on an H100), off on CPUs (compiling takes minutes
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
    # True: each fit writes step_stats.json in its folder: seconds per training step, the share
    # of it the device waits between steps (data loading), peak memory (tmerge.callbacks.StepStats).
    step_stats: bool = False

    def __post_init__(self) -> None:
        """Refuse values Lightning would reject (or run as nonsense) before a run folder exists.

        What this machine offers (an accelerator, a device count, a strategy's requirements) is
        checked when a stage starts (:func:`check_trainer`), not here: ``--show-config`` of a GPU
        job composes on a login node, and ``tmerge predict`` reads a GPU run's config on a CPU."""
        accelerators = accelerator_names()
        if self.accelerator not in accelerators:
            raise ConfigError(
                f"trainer.accelerator: got {self.accelerator!r}; expected one of {', '.join(accelerators)}"
            )
        check_devices(self.devices)
        check_count("trainer.num_nodes", self.num_nodes, 1)
        strategies = strategy_names()
        if str(self.strategy).lower() not in strategies:
            raise ConfigError(
                f"trainer.strategy: got {self.strategy!r}; expected 'auto' or a Lightning strategy name, "
                "such as ddp, ddp_spawn, fsdp or deepspeed (all: lightning.pytorch.strategies.StrategyRegistry)"
            )
        check_precision(self.precision, "trainer.precision")
        check_compile(self.compile, "trainer.compile")
        check_count("trainer.max_epochs", self.max_epochs, 1)  # every stage with a trainer trains
        check_count("trainer.min_epochs", self.min_epochs, 0)
        if self.min_epochs > self.max_epochs:
            raise ConfigError(
                f"trainer.min_epochs: got {self.min_epochs}, more than trainer.max_epochs={self.max_epochs}; "
                "expected 0 <= min_epochs <= max_epochs"
            )
        check_count("trainer.patience", self.patience, 0)
        check_batches("trainer.limit_train_batches", self.limit_train_batches, allow_zero=False)
        # 0 is Lightning's way to skip validation (the last checkpoint is then the result).
        check_batches("trainer.limit_val_batches", self.limit_val_batches, allow_zero=True)
        check_count("trainer.check_val_every_n_epoch", self.check_val_every_n_epoch, 1)
        check_count("trainer.log_every_n_steps", self.log_every_n_steps, 1)


def accelerator_names() -> list[str]:
    """The ``accelerator`` values Lightning knows: ``auto``, ``gpu`` and its registry's names."""
    from lightning.pytorch.accelerators import AcceleratorRegistry

    return ["auto", "cpu", "gpu", *sorted(set(AcceleratorRegistry.available_accelerators()) - {"cpu"})]


def strategy_names() -> set[str]:
    """The ``strategy`` names Lightning accepts: ``auto`` and its registry's."""
    from lightning.pytorch.strategies import StrategyRegistry

    return {"auto", *StrategyRegistry.available_strategies()}


def precision_names() -> list[str]:
    """The ``precision`` values Lightning accepts (as strings), and the project's ``auto``."""
    import typing

    from lightning.fabric.connector import _PRECISION_INPUT

    def flat(hint: Any) -> list[Any]:
        args = typing.get_args(hint)
        return [v for a in args for v in flat(a)] if args else [hint]

    names = ["auto"]
    for value in flat(_PRECISION_INPUT):
        if str(value) not in names:
            names.append(str(value))
    return sorted(names, key=lambda n: n != "auto" and "-" not in n)  # full names before aliases


def check_precision(value: Any, key: str) -> None:
    """Refuse a precision Lightning does not accept, naming ``key``."""
    names = precision_names()
    if str(value) not in names:
        raise ConfigError(f"{key}: got {value!r}; expected one of {', '.join(names)}")


def check_compile(value: Any, key: str) -> None:
    """Refuse a compile switch other than auto/true/false (any case; a bool as it is)."""
    if not isinstance(value, bool) and str(value).strip().lower() not in ("auto", "true", "false"):
        raise ConfigError(f"{key}: got {value!r}; expected 'auto', 'true' or 'false'")


def check_devices(value: Any) -> None:
    """Refuse a ``trainer.devices`` that is no device count, id list or ``auto``.

    Allowed: ``auto``; an int >= 1 or -1 (every device), also as a string; a non-empty list of
    distinct device ids >= 0, also as a comma-separated string (``"0,1"``). Whether this machine
    has them is :func:`check_trainer`'s question.
    """
    ok = False
    if isinstance(value, bool):
        ok = False
    elif isinstance(value, int):
        ok = value >= 1 or value == -1
    elif isinstance(value, str):
        text = value.strip()
        parts = [p.strip() for p in text.split(",")]
        if text == "auto" or text == "-1":
            ok = True
        elif "," in text:
            ok = all(p.isdigit() for p in parts) and len(set(map(int, parts))) == len(parts)
        else:
            ok = text.isdigit() and int(text) >= 1
    elif isinstance(value, (list, tuple)):
        ok = (
            len(value) > 0
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
            and len(set(value)) == len(value)
        )
    if not ok:
        raise ConfigError(
            f"trainer.devices: got {value!r}; expected a device count >= 1, -1 (every device), "
            "a list of distinct device ids such as [0, 1], or 'auto'"
        )


def check_batches(key: str, value: float, *, allow_zero: bool) -> None:
    """Refuse a ``limit_*_batches`` that is neither a fraction (<= 1) nor a whole batch count."""
    fraction = (value >= 0 if allow_zero else value > 0) and value <= 1
    count = value > 1 and math.isfinite(value) and float(value).is_integer()
    if not (fraction or count):
        low = "[0, 1]" if allow_zero else "(0, 1]"
        raise ConfigError(f"{key}: got {value!r}; expected a fraction in {low} or a whole batch count > 1")


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


#: What Lightning raises when its own argument checks refuse a Trainer setting.
_REFUSALS = (MisconfigurationException, ValueError, TypeError, ImportError)
#: The Trainer arguments taken from the user's settings that Lightning checks against this
#: machine, in the order their culprit is looked for, with values it accepts anywhere.
_NEUTRAL = {"strategy": "auto", "devices": 1, "precision": "32-true", "num_nodes": 1, "accelerator": "auto"}


def available_accelerators() -> list[str]:
    """The ``accelerator`` names this machine can run: ``cpu``, ``gpu`` with a CUDA or MPS
    device, and each of Lightning's accelerators that says it is available."""
    from lightning.pytorch.accelerators import AcceleratorRegistry

    found = ["cpu"]
    for name in sorted(set(AcceleratorRegistry.available_accelerators()) - {"cpu"}):
        try:
            available = AcceleratorRegistry[name]["accelerator"].is_available()
        except Exception:  # noqa: BLE001 - e.g. an XLA build that cannot start: not available
            available = False
        if available:
            found.append(name)
    if "cuda" in found or "mps" in found:
        found.insert(1, "gpu")
    return found


def _machine_args(cfg: TrainerConfig) -> dict[str, Any]:
    return {
        "accelerator": cfg.accelerator,
        "devices": cfg.devices,
        "num_nodes": cfg.num_nodes,
        "strategy": cfg.strategy,
        "precision": resolve_precision(cfg.precision, cfg.accelerator),
    }


def _build_check(args: dict[str, Any]) -> Exception | None:
    """What Lightning refuses in a Trainer of ``args`` alone (nothing of tmerge's), or None."""
    try:
        L.Trainer(
            **args,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
    except _REFUSALS as exc:
        return exc
    return None


def check_trainer(cfg: TrainerConfig) -> None:
    """Whether this machine can run the trainer settings ``cfg``; call it before a stage
    creates anything.

    The accelerator must be present here; then Lightning's own checks of the accelerator,
    devices, strategy, precision and node count run on a Trainer built from those settings
    alone (a device id this machine lacks, a strategy that needs a GPU or a missing package,
    a precision the accelerator cannot run).

    Raises:
        ConfigError: naming the trainer key at fault (the one whose neutral value Lightning
            accepts), the value received and Lightning's reason.
    """
    found = available_accelerators()
    if cfg.accelerator != "auto" and cfg.accelerator not in found:
        kinds = {"gpu": "CUDA/MPS", "cuda": "CUDA", "mps": "MPS", "tpu": "TPU (XLA)"}
        kind = kinds.get(cfg.accelerator, "such")
        options = [*found, "auto"]
        raise ConfigError(
            f"trainer.accelerator: got {cfg.accelerator!r} but no {kind} device was found on this machine; "
            f"expected {', '.join(options[:-1])} or {options[-1]}"
        )
    quiet_lightning()
    args = _machine_args(cfg)
    refused = _build_check(args)
    if refused is None:
        return
    reason = " ".join(str(refused).split()) or type(refused).__name__
    for key, neutral in _NEUTRAL.items():
        if args[key] != neutral and _build_check({**args, key: neutral}) is None:
            value = repr(getattr(cfg, key))
            if key == "precision" and args[key] != cfg.precision:
                value += f" (here {args[key]})"
            raise ConfigError(
                f"trainer.{key}: got {value} but Lightning refuses it on this machine: {reason}"
            )
    given = ", ".join(f"{key}={getattr(cfg, key)!r}" for key in reversed(_NEUTRAL))
    raise ConfigError(
        f"trainer ({given}): Lightning refuses these settings together on this machine: {reason}"
    )


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
    # Last, so that its end-of-training peak memory includes the other callbacks' (the Fisher).
    stats: list[Callback] = [StepStats(run_dir / STEP_STATS_FILE)] if trainer_cfg.step_stats else []
    try:
        trainer = L.Trainer(
            default_root_dir=str(run_dir),
            **_machine_args(trainer_cfg),
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
            callbacks=[best, checkpoint, *stoppers, RngState(), sigterm, *progress, *callbacks, *stats],
        )
    except _REFUSALS:
        # Lightning's own argument checks: the user's settings alone give a ConfigError naming
        # the key; if they pass, tmerge's own arguments are at fault and the traceback stays.
        check_trainer(trainer_cfg)
        raise
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
