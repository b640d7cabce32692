"""Loggers: a CSV log in every stage's folder, and one W&B run per process.

A process (one ``tmerge`` command) opens at most one W&B run, :func:`wandb_run`, and every stage
of it logs into that run through a :class:`StageLogger` under its own key prefix
(``adaption/val/loss``, ``finetune/val/dice``; a source run has one stage and no prefix). That is
what ``wandb agent`` expects: it pins the run id of the process it starts (``WANDB_RUN_ID``),
and a second ``wandb.init`` in the same process would resume or collide with it. Under the
agent the run joins its sweep by itself (``WANDB_SWEEP_ID``), and the sweep's parameters arrive
as the command's own ``key=value`` overrides (``experiments/sweeps/``).

W&B is offline by default: nothing leaves the machine; ``wandb sync runs/wandb/offline-run-*``
uploads later. ``WANDB_MODE`` in the environment overrides ``logger.wandb.mode``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from tmerge.resume import is_rank_zero
from tmerge.runs import LOGS_DIR, METRICS_CSV


@dataclass
class WandbConfig:
    """Weights & Biases logging through Lightning's ``WandbLogger``."""

    # "offline" (default: nothing leaves the machine; `wandb sync runs/wandb/...` later),
    # "online", or "disabled". WANDB_MODE in the environment overrides this.
    mode: str = "offline"
    project: str = "tmerge"
    entity: str | None = None
    group: str | None = None  # runs of one sweep share a group
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


def wandb_mode(cfg: LoggerConfig) -> str:
    """``offline``, ``online`` or ``disabled``: ``WANDB_MODE`` if set, else the config's."""
    return os.environ.get("WANDB_MODE", cfg.wandb.mode)


def open_wandb(cfg: LoggerConfig, runs_root: Path, name: str, config: dict[str, Any]) -> Logger | None:
    """The process's W&B run as a Lightning ``WandbLogger`` (None when disabled).

    The run directory is ``<runs_root>/wandb``. The run itself starts lazily, on the first
    metric (Lightning's ``rank_zero_experiment``), so DDP ranks other than 0 never open one.
    """
    mode = wandb_mode(cfg)
    if mode == "disabled":
        return None
    from lightning.pytorch.loggers import WandbLogger

    if mode == "offline":
        # wandb's own banners and deprecation notes say nothing useful offline.
        os.environ.setdefault("WANDB_SILENT", "true")
    (runs_root / "wandb").mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(
        name=name,
        save_dir=str(runs_root),
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        group=cfg.wandb.group,
        tags=list(cfg.wandb.tags),
        mode=mode,
        config=config,
        # No network: never wait on a connection or print retry noise.
        settings={"silent": True, "console": "off"} if mode == "offline" else None,
    )
    # Lightning always forwards `anonymous`, which wandb >= 0.19 deprecates with a warning on
    # every run; the setting has no effect there, so leave it out.
    logger._wandb_init.pop("anonymous", None)
    return logger


def close_wandb(run: Logger | None, failed: bool = False) -> None:
    """Finish the process's W&B run (if one was started), marking it failed on an exception."""
    if run is None or not is_rank_zero() or getattr(run, "_experiment", None) is None:
        return
    run.experiment.finish(exit_code=1 if failed else 0)


@contextmanager
def wandb_run(
    cfg: LoggerConfig, runs_root: Path, name: str, config: dict[str, Any]
) -> Iterator[Logger | None]:
    """:func:`open_wandb` for the body of a ``with``; the run is finished when it ends."""
    run = open_wandb(cfg, runs_root, name, config)
    try:
        yield run
    except BaseException:
        close_wandb(run, failed=True)
        raise
    close_wandb(run)


class StageLogger(Logger):
    """One stage's view of the process's W&B run: metric keys gain the prefix ``<stage>/``.

    The x-axis stays Lightning's ``trainer/global_step``, which restarts with every stage's
    trainer; each stage's keys are series of their own, so nothing collides. Hyper-parameters
    are not logged again per stage: the run's config is the whole command's, given when the run
    was opened. ``finalize`` does not finish the run; :func:`close_wandb` does, once.
    """

    def __init__(self, run: Logger, stage: str) -> None:
        super().__init__()
        self.run = run
        self.stage = stage

    @property
    @override
    def name(self) -> str | None:
        return self.run.name

    @property
    @override
    def version(self) -> int | str | None:
        return self.run.version

    @property
    @override
    def save_dir(self) -> str | None:
        return self.run.save_dir

    @property
    def experiment(self) -> Any:
        return self.run.experiment

    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.run.log_metrics({f"{self.stage}/{k}": v for k, v in metrics.items()}, step=step)

    @override
    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the run's config is the command's (see the class docstring)


def stage_loggers(run_dir: Path, run: Logger | None, stage: str | None = None) -> list[Logger]:
    """A stage's loggers: a CSV log in ``run_dir/logs`` and, with a W&B ``run``, that run under
    the key prefix ``stage`` (None: the run itself, unprefixed)."""
    _keep_previous_csv(run_dir / LOGS_DIR)
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name=LOGS_DIR, version="")]
    if run is not None:
        loggers.append(run if stage is None else StageLogger(run, stage))
    return loggers


def wandb_loggers(loggers: list[Logger] | tuple[Logger, ...]) -> list[Any]:
    """The W&B run among a stage's ``loggers`` (unprefixed) on global rank 0; empty elsewhere."""
    if rank_zero_only.rank != 0:
        return []
    runs = [lg.run if isinstance(lg, StageLogger) else lg for lg in loggers]
    return [lg for lg in runs if type(lg).__name__ == "WandbLogger"]


def _keep_previous_csv(log_dir: Path) -> None:
    """Lightning's CSV logger deletes a metrics file it finds; a resumed run keeps the earlier
    attempt's as ``<name>.attempt<k>.csv``."""
    current = log_dir / METRICS_CSV
    if current.is_file() and is_rank_zero():
        stem = current.name.removesuffix(".csv")
        k = 1 + sum(1 for _ in log_dir.glob(f"{stem}.attempt*.csv"))
        current.rename(log_dir / f"{stem}.attempt{k}.csv")
