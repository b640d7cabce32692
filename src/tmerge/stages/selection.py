"""Choosing among an initialisation's hyper-parameter candidates on validation (the task-vector
methods' λ, k, p, t grids): each candidate's merged P, frozen, gets S trained as in the T-IMM
adaption stage, and the one with the lowest validation loss is fine-tuned. Never on test.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch

from tmerge.data.target import TargetDataModule
from tmerge.io import write_json
from tmerge.resume import is_rank_zero
from tmerge.runner import fit
from tmerge.runs import SELECTION_DIR, SELECTION_FILE
from tmerge.sources import Source
from tmerge.stages.configs import TargetStageConfig
from tmerge.stages.initialisation import Initialisation
from tmerge.stages.inits import initialise
from tmerge.stages.module import segmentation_module

log = logging.getLogger("tmerge")


def select_candidate(
    cfg: TargetStageConfig,
    init: Initialisation,
    dm: TargetDataModule,
    sources: list[Source],
    base: dict[str, torch.Tensor] | None,
    run_dir: Path,
) -> dict[str, Any]:
    """The candidate of ``init.candidates`` to fine-tune: the only one, or the one whose
    merged P, frozen, reaches the lowest validation loss after S (norms, heads, re-initialised
    layers) is trained as in the T-IMM adaption stage (``adaption.lr``, early stopping on the
    validation loss, ``adaption.max_epochs``). Records the choice when it chose."""
    assert init.candidates is not None, "select_candidate: an initialisation without a grid"
    candidates = init.candidates(cfg)
    if len(candidates) == 1:
        return candidates[0]
    scores = []
    for i, params in enumerate(candidates):
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        start = initialise(cfg, init, cfg.net.build(dm.in_channels, dm.n_outputs), sources, base, params)
        frozen = {n for ns in start.layers.values() for n in ns}
        for name, param in start.net.named_parameters():
            param.requires_grad_(name not in frozen)
        module = segmentation_module(
            start.net, dm, cfg, cfg.data.patch_size, optim=dataclasses.replace(cfg.optim, lr=cfg.adaption.lr)
        )
        label = f"p{cfg.data.portion}/{cfg.init} selection {i + 1}/{len(candidates)} {params}"
        _, result = fit(
            module,
            dm,
            run_dir=run_dir / SELECTION_DIR / str(i),
            trainer_cfg=cfg.trainer,
            monitor="val/loss",
            mode="min",
            name=label,
            max_epochs=cfg.adaption.max_epochs,
            patience=cfg.adaption.patience,
        )
        scores.append({"params": params, "val_loss": result.best_score, "epochs": result.epochs})
        log.info("%s: best val loss %.4f", label, float("nan") if result.best_score is None else result.best_score)
    best = min(scores, key=lambda r: float("inf") if r["val_loss"] is None else r["val_loss"])
    if is_rank_zero():
        record = {"method": init.method, "candidates": scores, "chosen": best["params"]}
        write_json(run_dir / SELECTION_FILE, record)
    chosen_loss = float("nan") if best["val_loss"] is None else best["val_loss"]
    log.info("%s: chose %s (val loss %.4f)", cfg.init, best["params"], chosen_loss)
    return best["params"]
