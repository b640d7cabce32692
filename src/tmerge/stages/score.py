"""``tmerge score predictions=DIR labels=DIR``: grade a folder of predicted BraTS label maps.

Scores each ``<subject>.nii.gz`` of ``predictions`` against the subject's true label map the way
the BraTS leaderboard does: Dice and HD95 (mm, from the affine) per region ET (4), TC (1 ∪ 4)
and WT (1 ∪ 2 ∪ 4). HD95 is, by default, the 95th percentile of the border distances of both
directions pooled, as the BraTS organisers' tool (medpy) computes it (``metrics.hd95=directed``:
MONAI's larger directed percentile). Empty regions follow ``metrics.convention``: ``brats2018``
(default) scores empty-versus-empty Dice 1 and HD95 0, a missed or hallucinated region Dice 0
and HD95 the volume's diagonal; ``brats2023`` scores empty-versus-empty NaN (left out of the
means, counted in the summary's ``n_empty``) and any region without overlap Dice 0 and HD95
373.13 mm (see :mod:`tmerge.metrics`). This is how the ``predictions/validation/`` export of a
``portion=100`` run is graded when its labels exist.

The true label map of a subject is looked for in ``labels`` as ``<subject>.nii.gz``,
``<subject>_seg.nii.gz`` (``-seg``: BraTS 2023) or, anywhere below, ``<subject>/<subject>_seg.nii.gz``
(the BraTS layouts; ``.nii`` too). ``convention=brats2023`` reads both folders' values as BraTS
2023's (3 = enhancing); that names the files' label values only, the scoring rules are
``metrics.*``. Writes ``<out>/scores.csv`` (the columns of a target run's per-subject
scores) and then ``<out>/scores_summary.json`` (means, as a target run's summary).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tmerge.data.geometry import voxel_spacing
from tmerge.data.labels import BRATS2023_LABELS, REGIONS, LabelMapping, check_brats_labels
from tmerge.data.nifti import load_labels
from tmerge.errors import ConfigError, DataError
from tmerge.evaluate import MetricsConfig, format_summary, score_label_maps, write_scores

log = logging.getLogger("tmerge")

NIFTI = (".nii.gz", ".nii")
#: Label conventions → how a file's values become BraTS 2018's (None: they already are).
CONVENTIONS: dict[str, LabelMapping | None] = {"brats2018": None, "brats2023": BRATS2023_LABELS}


@dataclass
class ScoreConfig:
    """Config of ``tmerge score``."""

    predictions: str | None = None  # folder of <subject>.nii.gz label maps (0/1/2/4)
    labels: str | None = None  # folder holding the true label maps (see the module doc)
    out: str | None = None  # where scores.csv and scores_summary.json go; None: the predictions folder
    # The label values of both folders: "brats2018" (0/1/2/4, also BraTS 2021) or "brats2023"
    # (0/1/2/3, 3 = enhancing), as tmerge writes predictions for a dataset of that layout.
    convention: str = "brats2018"
    # How the scores are computed: HD95 "pooled" (BraTS/medpy, default) or "directed" (MONAI);
    # empty regions by the "brats2018" (default) or the "brats2023" rules.
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self) -> None:
        if self.convention not in CONVENTIONS:
            raise ConfigError(f"convention: expected one of {', '.join(CONVENTIONS)}, got {self.convention!r}")


def _subject(path: Path) -> str | None:
    return next((path.name[: -len(ext)] for ext in NIFTI if path.name.endswith(ext)), None)


def find_label(labels: Path, subject: str) -> Path | None:
    """The true label map of ``subject`` under ``labels`` (see the module doc), or None."""
    for ext in NIFTI:
        for name in (f"{subject}{ext}", f"{subject}_seg{ext}", f"{subject}-seg{ext}"):
            if (labels / name).is_file():
                return labels / name
    for ext in NIFTI:
        for sep in ("_", "-"):  # BraTS 2018/2021 name it <case>_seg, BraTS 2023 <case>-seg
            found = sorted(labels.rglob(f"{subject}/{subject}{sep}seg{ext}"))
            if found:
                return found[0]
    return None


def run_score(cfg: ScoreConfig) -> Path:
    """Score every prediction; return the CSV written.

    Raises:
        ConfigError: ``predictions`` or ``labels`` not given or not a folder.
        DataError: no predictions; a prediction without a label map (all are named); a label map
            of another grid or orientation; values that are not BraTS labels.
    """
    for key in ("predictions", "labels"):
        value = getattr(cfg, key)
        if value is None or not Path(value).expanduser().is_dir():
            raise ConfigError(f"{key}: expected a folder of NIfTI label maps, got {value!r}")
    predictions, labels = Path(cfg.predictions).expanduser(), Path(cfg.labels).expanduser()
    files = {s: p for p in sorted(predictions.iterdir()) if p.is_file() and (s := _subject(p))}
    if not files:
        raise DataError(f"{predictions}: no <subject>.nii.gz predictions found")
    truths = {s: find_label(labels, s) for s in files}
    missing = [s for s, t in truths.items() if t is None]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(
            f"{labels}: no label map for {len(missing)} of {len(files)} predictions ({shown}); expected "
            "<subject>.nii.gz, <subject>_seg.nii.gz or <subject>/<subject>_seg.nii.gz"
        )
    records = []
    for i, (subject, path) in enumerate(files.items(), start=1):
        pred, pred_affine = load_labels(path)
        truth, affine = load_labels(truths[subject])
        mapping = CONVENTIONS[cfg.convention]
        if mapping is not None:  # names the file and the values it expected if one is not its
            pred, truth = mapping.to_internal(pred, path), mapping.to_internal(truth, truths[subject])
        check_brats_labels(pred, path)
        check_brats_labels(truth, truths[subject])
        if pred.shape != truth.shape or not np.allclose(pred_affine, affine, atol=1e-4):
            raise DataError(
                f"{path}: shape {pred.shape} on another grid than its label map {truths[subject]} "
                f"(shape {truth.shape}); expected the prediction in the label map's geometry"
            )
        scores = score_label_maps(pred, truth, "sigmoid", REGIONS, voxel_spacing(affine), cfg.metrics)
        records.append({"subject": subject, **scores})
        if i % 25 == 0 or i == len(files):
            log.info("score: %d/%d subjects", i, len(files))
    out = Path(cfg.out).expanduser() if cfg.out else predictions
    summary = write_scores(
        out / "scores.csv", out / "scores_summary.json", records, list(REGIONS), cfg.metrics.convention
    )
    log.info(
        "score (HD95 %s, %s rules): %s → %s",
        cfg.metrics.hd95,
        cfg.metrics.convention,
        format_summary(summary),
        out / "scores.csv",
    )
    return out / "scores.csv"
