"""T-IMM's adaption stage (paper §3.3): with the sources frozen, learn the mixing ratios δ (α per
layer and source, eq. 2 in every forward) and the task-specific parameters S on the target,
until the validation loss stops improving; then materialise P from the α of the best epoch.

Writes ``adaption/`` (the stage's checkpoints and log) and the α record (the final α, their
trajectory over the epochs, the best epoch, δ's learning rate and the Fisher mode) in the run
folder; the α also go to W&B (the paper's Fig. 5).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from torch import nn

from tmerge.callbacks import AlphaTrajectory
from tmerge.callbacks.learning_curve import untouched
from tmerge.dashboard import log_alphas
from tmerge.data.target import TargetDataModule
from tmerge.errors import RunError
from tmerge.io import read_json, write_json
from tmerge.loggers import stage_loggers
from tmerge.merge import AdaptiveMerge
from tmerge.nets import input_names, partition
from tmerge.runner import fit
from tmerge.runs import ADAPTION_DIR, ALPHAS_FILE, WARMUP_DIR, best_state_dict
from tmerge.sources import Source
from tmerge.stages.configs import TargetStageConfig
from tmerge.stages.initialisation import Initialised
from tmerge.stages.module import segmentation_module
from tmerge.stages.results import curve_score

log = logging.getLogger("tmerge")


def _budget(cfg: TargetStageConfig) -> dict[str, Any]:
    """The adaption's (and the warm-up's) budget: until the validation loss stops improving
    (paper), or exactly ``fixed.warmup_epochs`` with the last epoch's weights (fixed)."""
    if cfg.protocol == "fixed":
        return {"max_epochs": cfg.fixed.warmup_epochs, "select": "last"}
    return {"max_epochs": cfg.adaption.max_epochs, "patience": cfg.adaption.patience}


def warm_up(
    cfg: TargetStageConfig,
    dm: TargetDataModule,
    net: nn.Module,
    run_dir: Path,
    run: Logger | None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The fixed protocol's S warm-up for the initialisations without an adaption stage: P
    frozen, S and the input layer trained at ``adaption.lr`` for ``fixed.warmup_epochs`` — the
    T-IMM adaption without δ, so that every initialisation gets the same steps before
    fine-tuning. With random P (``init=none``) it is the frozen-feature probe."""
    fused, _ = partition(net)
    frozen = set(fused) - set(input_names(net, fused))
    for name, param in net.named_parameters():
        param.requires_grad_(name not in frozen)
    module = segmentation_module(net, dm, cfg, cfg.data.patch_size, optim=cfg.stage_optim(cfg.adaption.lr))
    stage_dir = run_dir / WARMUP_DIR
    _, result = fit(
        module,
        dm,
        run_dir=stage_dir,
        trainer_cfg=cfg.trainer,
        loggers=stage_loggers(stage_dir, run, "warmup"),
        monitor="val/loss",
        mode="min",
        name=f"p{cfg.data.portion}/{cfg.init} warm-up (P frozen)",
        **_budget(cfg),
    )
    if result.best_path:
        module.load_state_dict(best_state_dict(result.best_path, prefix=""))
    for param in net.parameters():
        param.requires_grad_(True)
    return net, {**result.as_dict(), "frozen": len(frozen), "test": probe_scores(dm, module)}


def probe_scores(dm: TargetDataModule, module: L.LightningModule) -> dict[str, float]:
    """The test scores of a network whose P was frozen (the end of a warm-up or an adaption):
    the frozen-feature probe of the premise checks — what the initialisation's P alone is worth
    on the target. A scoring pass that leaves the training untouched (random state restored)."""
    with untouched(module):
        return curve_score(dm)(None, module)  # type: ignore[arg-type]


def scores_text(summary: dict[str, Any], fixed: bool) -> str:
    """How the adaption's log line states its scores: the validation Dice and loss of the best
    epoch (``nan`` where none was measured) or, under the fixed protocol, the probe's test Dice."""
    if fixed:
        return f"no validation (fixed protocol), probe test Dice {summary['test'].get('dice_mean', float('nan')):.3f}"
    # `is None`, not `or`: a Dice of exactly 0 is a score (``0.0 or nan`` was nan).
    dice, loss = (float("nan") if v is None else v for v in (summary["val_dice"], summary["val_loss"]))
    return f"val Dice {dice:.3f}, val loss {loss:.4f}"


def adapt(
    cfg: TargetStageConfig,
    dm: TargetDataModule,
    net: nn.Module,
    sources: list[Source],
    start: Initialised,
    run_dir: Path,
    run: Logger | None,
) -> tuple[nn.Module, dict[str, Any]]:
    """T-IMM adaption stage: train δ (at ``adaption.delta_lr``) and S (at ``adaption.lr``) on the
    target with the sources frozen until the validation loss stops improving; return the net
    with P materialised from the α of the best epoch (S kept) and the stage's summary. Writes
    the α record (:data:`~tmerge.runs.ALPHAS_FILE`): the final α and their trajectory."""
    adaptive = AdaptiveMerge(net, [s.state for s in sources], start.fishers, start.layers, eps=start.eps)
    module = segmentation_module(
        adaptive,
        dm,
        cfg,
        cfg.data.patch_size,
        optim=cfg.stage_optim(cfg.adaption.lr),
        group_lrs={"net.mixing.": cfg.adaption.delta_lr},
    )
    names = [s.name for s in sources]
    trajectory = AlphaTrajectory(adaptive.mixing, names)
    stage_dir = run_dir / ADAPTION_DIR
    label = f"p{cfg.data.portion}/{cfg.init} adaption"
    loggers = stage_loggers(stage_dir, run, "adaption")
    trainer, result = fit(
        module,
        dm,
        run_dir=stage_dir,
        trainer_cfg=cfg.trainer,
        loggers=loggers,
        monitor="val/loss",
        mode="min",
        callbacks=[trajectory],
        name=label,
        **_budget(cfg),
    )
    if result.best_path:  # continue from the adaption epoch with the lowest validation loss
        module.load_state_dict(best_state_dict(result.best_path, prefix=""))
    scores = result.best_metrics
    alphas = adaptive.mixing.alphas_dict()
    # δ's gradients are all-reduced like any parameter's, so every rank must hold the same α;
    # check it rather than trust it (a rank that diverged would fine-tune another model).
    # (Without a process group — one process, or a re-run that skipped the finished adaption —
    # every rank has just loaded the same checkpoint.)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        deltas = trainer.strategy.all_gather(adaptive.mixing.delta.detach())
        deltas = deltas.reshape(-1, *adaptive.mixing.delta.shape)
        spread = float((deltas - deltas[0]).abs().max())
        if spread > 1e-6:
            raise RunError(
                f"{cfg.init} adaption: the DDP ranks ended with different mixing ratios (max |Δδ| = {spread:.3g})"
            )
    epochs = trajectory.trajectory
    alphas_file = run_dir / ALPHAS_FILE
    if not epochs and alphas_file.is_file():
        # A re-run after a kill that came after the adaption: its fit is not repeated, so the
        # trajectory is the one the first attempt recorded.
        epochs = read_json(alphas_file).get("trajectory", [])
    if trainer.is_global_zero:
        write_json(
            alphas_file,
            {
                "sources": names,
                "layers": list(alphas),
                "alphas": alphas,
                "best_epoch": result.best_epoch,
                "trajectory": epochs,
                "delta_lr": cfg.adaption.delta_lr,
                "eps": cfg.adaption.eps,  # relative ε of eq. 2 (forgetting's T-IMM row merges with it)
                "fisher": cfg.fisher.normalize if start.fishers is not None else "unit",
                "world_size": trainer.world_size,
                "ranks_agree": True,
            },
        )
    log_alphas(loggers, alphas, names, step=trainer.global_step, trajectory=epochs)  # paper Fig. 5
    summary = {**result.as_dict(), "val_dice": scores.get("val/dice"), "val_loss": scores.get("val/loss")}
    if cfg.protocol == "fixed":  # the merged P's probe, as every other init's warm-up records it
        summary["test"] = probe_scores(dm, module)
    first = [a[0] for a in alphas.values()]
    scored = scores_text(summary, fixed=cfg.protocol == "fixed")
    log.info(
        "%s: %d epochs (best %s), %s; α of %s per layer %.2f–%.2f (mean %.2f): %s",
        label,
        result.epochs,
        result.best_epoch,
        scored,
        names[0],
        min(first),
        max(first),
        sum(first) / len(first),
        " ".join(f"{a:.2f}" for a in first),
    )
    return adaptive.release(), summary
