"""A target run's results: the test scores (per subject and summary), the stages' record, the
fine-tuned weights, and the W&B model artifact. Formats: :mod:`tmerge.evaluate`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import Logger
from torch import nn

from tmerge.artifacts import TARGET_TYPE, log_model
from tmerge.data.target import TargetDataModule
from tmerge.evaluate import dice_summary, evaluate_subject, regions_csv, write_scores
from tmerge.io import write_json, write_text
from tmerge.modules.segmentation import SegmentationModule
from tmerge.runs import (
    NET_FILE,
    PER_SUBJECT_FILE,
    REGIONS_FILE,
    STAGES_FILE,
    TARGET_FILE,
    TARGET_MARKER,
    save_net,
)
from tmerge.stages.configs import TargetStageConfig
from tmerge.stages.module import architecture_meta


@dataclass
class Tested:
    """What testing the best model returned: per-subject scores (``subject``, ``dice_<c>``,
    ``hd95_<c>``) of every rank, sorted by subject, and up to three preview slices."""

    records: list[dict[str, Any]]
    previews: list[dict[str, Any]]


def test_subjects(trainer: L.Trainer, module: SegmentationModule, dm: Any, best_path: str) -> Tested:
    """Test the best checkpoint (``best_path``; "" → the module as it is) on ``dm``'s test
    subjects, each scored in its original geometry, and return the scores."""
    trainer.test(module, datamodule=dm, ckpt_path=best_path or None, verbose=False, weights_only=True)
    return Tested(list(module.test_records), list(module.test_previews))


def write_results(
    run_dir: Path,
    cfg: TargetStageConfig,
    dm: TargetDataModule,
    net: nn.Module,
    records: list[dict[str, Any]],
    stages: dict[str, Any],
    run: Logger | None,
) -> dict[str, Any]:
    """Everything a finished target run leaves (rank 0): the stages' record, the fine-tuned best
    weights (for prediction and export), the test scores with the marker last, and the W&B model
    artifact of the three. Returns the test summary."""
    write_json(run_dir / STAGES_FILE, stages)
    write_json(run_dir / TARGET_FILE, dm.recorded())
    meta = target_meta(cfg, dm, list(stages["sources"]))
    save_net(run_dir / NET_FILE, net, meta)
    summary = write_test_results(run_dir, records, dm.class_names, cfg.metrics.convention)
    files = {f: run_dir / f for f in (NET_FILE, STAGES_FILE, TARGET_MARKER)}
    log_model(
        run,
        f"{dm.name}-p{cfg.data.portion}-{cfg.init}-seed{cfg.seed}",
        TARGET_TYPE,
        files,
        {**meta, "test": summary},
    )
    return summary


def target_meta(cfg: TargetStageConfig, dm: TargetDataModule, sources: list[str]) -> dict[str, Any]:
    """What travels with a target run's weights: the architecture and how they were made."""
    return {
        **architecture_meta(cfg, dm),
        "init": cfg.init,
        "portion": cfg.data.portion,
        "seed": cfg.seed,
        "sources": sources,
    }


def write_test_results(
    run_dir: Path, records: list[dict[str, Any]], class_names: list[str], convention: str = "brats2018"
) -> dict[str, Any]:
    """Write the per-subject scores and, last, the summary (the run's finished marker).

    Args:
        run_dir: The run folder.
        records: Per-subject scores ``subject``, ``dice_<c>``, ``hd95_<c>`` (any order).
        class_names: The scored classes (``ET``, ``TC``, ``WT``).
        convention: The run's ``metrics.convention`` (``brats2023`` adds ``n_empty``).

    Returns:
        The summary: ``{"n", "dice": {<c>…, "mean"}, "hd95": {<c>…}}`` (formats:
        :mod:`tmerge.evaluate`).
    """
    if records and all(f"truth_{c}" in r for r in records for c in class_names):
        # The voxels of each class per subject (which subjects lack one: the report's endpoints).
        write_text(run_dir / REGIONS_FILE, regions_csv(records, class_names))
    return write_scores(run_dir / PER_SUBJECT_FILE, run_dir / TARGET_MARKER, records, class_names, convention)


def curve_score(dm: TargetDataModule) -> Callable[[L.Trainer, L.LightningModule], dict[str, float]]:
    """The learning curve's score (:class:`~tmerge.callbacks.LearningCurve`): the module as it is
    now on every test subject, scored as the test is (original geometry, the module's
    ``metrics``; Dice per class and the mean of the per-subject means,
    :func:`tmerge.evaluate.dice_summary`). Dice only: no HD95, which no curve reports."""

    def score(trainer: L.Trainer, module: L.LightningModule) -> dict[str, float]:
        assert isinstance(module, SegmentationModule)
        module.eval()  # no dropout; LearningCurve restores the train/eval flags afterwards
        records = []
        for batch in dm.test_dataloader():
            logits = module.infer(batch["image"].to(module.device))
            for i, subject in enumerate(batch["subject"]):
                result = evaluate_subject(
                    logits[i], batch["label"][i], batch["meta"][i], module.scheme, metrics=module.metrics, hd95=False
                )
                records.append({"subject": subject, **result.scores})
        dice = dice_summary(records, module.class_names)
        return {f"dice_{c}": v for c, v in dice.items() if v is not None}

    return score
