"""Test-set evaluation and export in each subject's original geometry (paper §4.4, BraTS style).

The network predicts on the preprocessed grid (cropped to the brain, padded to a multiple of the
network's divisor).
A prediction is turned into a label map there, put back into the original voxel grid
(:func:`tmerge.data.geometry.uncrop`; outside the crop box is background) and scored against the
true label map on that full grid, with distances in mm from the image's affine.

The prediction becomes a label map through the target's :class:`~tmerge.data.schemes.LabelScheme`
and both prediction and truth are scored as the scheme's classes *of their label maps*:

* regions (``"sigmoid"``; BraTS: ET, TC, WT): the region outputs are painted into a label map,
  the largest region first so the innermost wins (BraTS: 0/1/2/4, exactly
  :func:`~tmerge.data.labels.regions_to_brats`), and each region is scored as the set of its
  label values in both maps — what the BraTS evaluation does with a submitted file;
* plain classes (``"softmax"``): the arg-max class, scored per foreground class.

Scores per subject and class: Dice and HD95 (:func:`tmerge.metrics.dice_masks`,
:func:`tmerge.metrics.hd95_masks`), as :class:`MetricsConfig` (``metrics.*``) says: HD95 pooled
over both directions as the BraTS organisers compute it (default) or MONAI's directed maximum,
and the empty-region rules of BraTS 2018–2021 (default) or of the current BraTS package
(:mod:`tmerge.metrics` states both).

Files (written by the stages, formats fixed because reports read them):

* the per-subject scores (:data:`~tmerge.runs.PER_SUBJECT_FILE`) — header ``subject,dice_<c>…,dice_mean,hd95_<c>…`` (for BraTS
  ``subject,dice_ET,dice_TC,dice_WT,dice_mean,hd95_ET,hd95_TC,hd95_WT``), one row per test subject,
  sorted by subject (:func:`per_subject_rows`);
* the summary (:data:`~tmerge.runs.TARGET_MARKER`) — ``{"n", "dice": {<c>…, "mean"}, "hd95": {<c>…}}``, means over subjects
  (:func:`summarise`); under ``metrics.convention=brats2023`` NaN scores (both masks empty) are
  left out of the means and counted in an added ``"n_empty": {<c>…}``;
* ``predictions/<subject>.nii.gz`` — the label map (``uint8``) with the subject's original shape
  and affine, in its dataset's label convention (BraTS 2018/2021 0/1/2/4, BraTS 2023 0/1/2/3,
  nnU-Net the dataset.json values; :mod:`tmerge.data.formats`); for the unlabelled BraTS
  validation set (the 100 % portion)
  ``predictions/validation/<subject>.nii.gz``, where the subject id is the BraTS folder name
  (``Brats18_<ID>``), i.e. the challenge's submission naming ``<ID>.nii.gz``.

A little over 400 lines, one concept: from logits to the scores and files above. Splitting the
scoring from the summaries would separate the file formats from the functions that write them.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from tmerge.data.geometry import uncrop, voxel_spacing
from tmerge.data.labels import dataset_labels
from tmerge.data.nifti import save_labels
from tmerge.data.preprocess import original_labels
from tmerge.data.schemes import BRATS_SCHEME, LabelScheme
from tmerge.errors import ConfigError
from tmerge.metrics import (
    EMPTY_CONVENTIONS,
    HD95_DEFINITIONS,
    check_output_mode,
    dice_masks,
    hd95_masks,
    logits_to_onehot,
    voxel_counts,
)

#: Sub-folder of a run with the exported label maps; unlabelled subjects go to its ``validation/``.

#: Prediction slices kept per test run for the dashboard (the first subjects by id).
N_PREVIEWS = 3

#: Names of the BraTS label values in exported maps and dashboard overlays.
BRATS_LABEL_NAMES: dict[int, str] = dict(BRATS_SCHEME.names)


@dataclass
class MetricsConfig:
    """How the test scores are computed (``metrics.*`` of a target run and of ``tmerge score``).

    ``hd95``: ``"pooled"``, the 95th percentile of the border distances of both directions
    together, as the BraTS organisers (medpy) compute it; ``"directed"``, the larger of the two
    directions' 95th percentiles, MONAI's (tmerge's HD95 before the pooled default).
    ``convention``: the empty-region rules, ``"brats2018"`` (BraTS 2018–2021: both empty → Dice
    1, HD95 0; one empty → Dice 0, HD95 the image's diagonal) or ``"brats2023"`` (the current
    BraTS package: both empty → NaN, left out of the means and counted; no overlap → Dice 0,
    HD95 373.13 mm). Details: :mod:`tmerge.metrics`.
    """

    hd95: str = "pooled"
    convention: str = "brats2018"

    def __post_init__(self) -> None:
        if self.hd95 not in HD95_DEFINITIONS:
            raise ConfigError(
                f"metrics.hd95: expected one of {', '.join(HD95_DEFINITIONS)}, got {self.hd95!r}"
            )
        if self.convention not in EMPTY_CONVENTIONS:
            raise ConfigError(
                f"metrics.convention: expected one of {', '.join(EMPTY_CONVENTIONS)}, got {self.convention!r}"
            )


class Prediction(NamedTuple):
    """One predicted volume as a module's ``test_step``/``predict_step`` returns it, for a
    :class:`~tmerge.callbacks.PredictionWriter`: ``labels`` ``(X, Y, Z)`` uint8 in the subject's
    original geometry (``meta``: its affine and crop; None: identity)."""

    subject: str
    labels: np.ndarray
    meta: Mapping[str, Any] | None


@dataclass
class SubjectResult:
    """One subject's prediction, in the original geometry when ``meta`` was given.

    Attributes:
        labels: ``(X, Y, Z)`` uint8 predicted label map (BraTS 0/1/2/4, or class indices).
        truth: ``(X, Y, Z)`` uint8 true label map, or ``None`` for unlabelled subjects.
        scores: ``{"dice_<c>": …, "hd95_<c>": …}`` per scored class (empty without truth).
        counts: ``{"truth_<c>": …, "pred_<c>": …}`` voxels of each class (empty without truth):
            which subjects lack a class, for the report's endpoints.
        spacing: Voxel size in mm per axis (1 without ``meta``).
    """

    labels: np.ndarray
    truth: np.ndarray | None
    scores: dict[str, float]
    spacing: tuple[float, ...]
    counts: dict[str, int] = field(default_factory=dict)  # truth_<c>, pred_<c>: voxels per class


Scheme = LabelScheme | str


def as_scheme(scheme: Scheme, class_names: Sequence[str] | None = None) -> LabelScheme:
    """A :class:`~tmerge.data.schemes.LabelScheme`, given as one or as an output mode with its
    class names (``"softmax"``: plain classes; ``"sigmoid"``: the BraTS regions)."""
    if isinstance(scheme, LabelScheme):
        return scheme
    if class_names is None:
        raise ValueError(f"output mode {scheme!r} needs its class names")
    return LabelScheme.of(check_output_mode(scheme), class_names)


def score_label_maps(
    pred: np.ndarray,
    truth: np.ndarray,
    scheme: Scheme,
    class_names: Sequence[str] | None = None,
    spacing: Sequence[float] | None = None,
    metrics: MetricsConfig | None = None,
    hd95: bool = True,
) -> dict[str, float]:
    """Dice and HD95 of a predicted against a true label map, per scored class.

    Args:
        pred, truth: ``(X, Y, Z)`` label maps on the same grid.
        scheme: The target's :class:`~tmerge.data.schemes.LabelScheme`, or an output mode
            (``"sigmoid"``: BraTS labels scored as ET/TC/WT; ``"softmax"``: class indices) with
            ``class_names``.
        class_names: Names of the scored classes, in order (with an output mode).
        spacing: Voxel size per axis in mm (``None``: 1).
        metrics: HD95 definition and empty-region convention (``None``: the defaults).
        hd95: False: Dice only (a learning-curve point needs no surface distances, which cost
            about as much as a third of the network's forward pass on a 64³ volume).

    Returns:
        ``{"dice_<c>": …, …, "hd95_<c>": …, …}`` (no ``hd95_<c>`` with ``hd95=False``).
    """
    scheme = as_scheme(scheme, class_names)
    if np.shape(pred) != np.shape(truth):
        raise ValueError(f"prediction {np.shape(pred)} and truth {np.shape(truth)} differ in shape")
    p = scheme.masks(pred)[None]
    t = scheme.masks(truth)[None]
    metrics = metrics or MetricsConfig()
    dice = dice_masks(p, t, metrics.convention)[0].tolist()
    scores = {f"dice_{c}": float(v) for c, v in zip(scheme.classes, dice, strict=True)}
    if hd95:
        dist = hd95_masks(p, t, spacing, definition=metrics.hd95, convention=metrics.convention)[0].tolist()
        scores.update({f"hd95_{c}": float(v) for c, v in zip(scheme.classes, dist, strict=True)})
    return scores


def evaluate_subject(
    logits: torch.Tensor,
    target: torch.Tensor | np.ndarray | None,
    meta: Mapping[str, Any] | None,
    scheme: Scheme,
    class_names: Sequence[str] | None = None,
    metrics: MetricsConfig | None = None,
    hd95: bool = True,
) -> SubjectResult:
    """Label map of one subject in its original geometry and, with a target, its scores there.

    Args:
        logits: ``(C, D, H, W)`` network output on the preprocessed grid.
        target: ``(L, D, H, W)`` training target on that grid, or ``None`` (unlabelled). The
            preprocessing crop keeps every labelled voxel, so the target put back into the
            original grid *is* the original label map.
        meta: The subject's preprocessing geometry (``original_shape``, ``affine``, crop box; see
            :func:`tmerge.data.geometry.uncrop`); ``None`` scores on the given grid, spacing 1.
        scheme: The target's :class:`~tmerge.data.schemes.LabelScheme`, or an output mode with
            ``class_names`` (see :func:`as_scheme`).
        class_names: Names of the scored classes (with an output mode).
        metrics: HD95 definition and empty-region convention (``None``: the defaults).
        hd95: False: score Dice only (:func:`score_label_maps`).

    Returns:
        The :class:`SubjectResult`.
    """
    scheme = as_scheme(scheme, class_names)
    onehot = logits_to_onehot(logits.detach()[None].float(), scheme.mode)[0].cpu().numpy()
    labels = scheme.label_map(onehot)
    truth = None if target is None else scheme.target_label_map(_numpy(target))
    spacing: tuple[float, ...] = (1.0,) * labels.ndim
    if meta is not None:
        labels = uncrop(labels, meta)
        truth = None if truth is None else original_labels(truth, meta)
        spacing = voxel_spacing(np.asarray(meta["affine"]))
    scores, counts = {}, {}
    if truth is not None:
        scores = score_label_maps(labels, truth, scheme, spacing=spacing, metrics=metrics, hd95=hd95)
        counts = voxel_counts(scheme.masks(labels), scheme.masks(truth), scheme.classes)
    return SubjectResult(labels=labels, truth=truth, scores=scores, spacing=spacing, counts=counts)


def prediction_file(folder: str | Path, subject: str) -> Path:
    """``<folder>/<subject>.nii.gz``: for BraTS the subject is the ``Brats18_<ID>`` folder name, so
    this is the challenge's submission naming."""
    return Path(folder) / f"{subject}.nii.gz"


def save_prediction(
    folder: str | Path, subject: str, labels: np.ndarray, meta: Mapping[str, Any] | None
) -> Path:
    """Write a label map from :func:`evaluate_subject` with the subject's original affine
    (identity without ``meta``), in its dataset's label convention (``meta["labels"]``, e.g.
    BraTS 2023's 3 for enhancing; :func:`tmerge.data.labels.dataset_labels`), atomically; return
    the file."""
    affine = np.eye(4) if meta is None else np.asarray(meta["affine"], dtype=np.float64)
    return save_labels(prediction_file(folder, subject), dataset_labels(labels, meta), affine)


def label_names(scheme: Scheme, class_names: Sequence[str] | None = None) -> dict[int, str]:
    """Label value → name for the values of a predicted label map (background included)."""
    return as_scheme(scheme, class_names).label_names()


def preview(
    image: torch.Tensor | np.ndarray, result: SubjectResult, meta: Mapping[str, Any] | None, subject: str
) -> dict[str, Any]:
    """A small 2-D view of one prediction for the dashboard.

    The axial slice (last array axis) with the most true foreground (else predicted, else the
    middle one) of the last input channel (FLAIR for BraTS), the true and the predicted label map.

    Args:
        image: ``(C, D, H, W)`` preprocessed input.
        result: The subject's :class:`SubjectResult`.
        meta: Its preprocessing geometry (``None``: the image is on the result's grid).
        subject: Subject id.

    Returns:
        ``{"subject", "slice", "image": (X, Y) float32 in [0, 1], "truth": (X, Y) uint8 or None,
        "prediction": (X, Y) uint8}``.
    """
    channel = _numpy(image)[-1].astype(np.float32)
    if meta is not None:
        channel = uncrop(channel, meta)
    area = (result.truth if result.truth is not None else result.labels) > 0
    per_slice = area.reshape(-1, area.shape[-1]).sum(axis=0)
    if not per_slice.any():
        per_slice = (result.labels > 0).reshape(-1, area.shape[-1]).sum(axis=0)
    z = int(per_slice.argmax()) if per_slice.any() else area.shape[-1] // 2
    low, high = float(channel.min()), float(channel.max())
    shown = (channel[..., z] - low) / (high - low) if high > low else np.zeros_like(channel[..., z])
    return {
        "subject": subject,
        "slice": z,
        "image": shown.astype(np.float32),
        "truth": None if result.truth is None else result.truth[..., z].copy(),
        "prediction": result.labels[..., z].copy(),
    }


def score_columns(class_names: Sequence[str]) -> list[str]:
    """Columns of the per-subject scores after ``subject``."""
    return [*(f"dice_{c}" for c in class_names), "dice_mean", *(f"hd95_{c}" for c in class_names)]


def _row(rec: Mapping[str, Any], class_names: Sequence[str], hd95: bool) -> dict[str, Any]:
    dice = [float(rec[f"dice_{c}"]) for c in class_names]
    scored = [d for d in dice if not math.isnan(d)]  # brats2023 leaves both-empty classes out
    row = {
        "subject": str(rec["subject"]),
        **{f"dice_{c}": d for c, d in zip(class_names, dice, strict=True)},
        "dice_mean": sum(scored) / len(scored) if scored else math.nan,
    }
    if hd95:
        row.update({f"hd95_{c}": float(rec[f"hd95_{c}"]) for c in class_names})
    return row


def per_subject_dice(
    records: Sequence[Mapping[str, Any]], class_names: Sequence[str]
) -> list[dict[str, Any]]:
    """``subject``, ``dice_<c>`` per class and ``dice_mean`` of each record, sorted by subject.
    ``dice_mean`` is the mean over the classes whose Dice is not NaN (NaN if none is)."""
    return [_row(r, class_names, hd95=False) for r in sorted(records, key=lambda r: str(r["subject"]))]


def per_subject_rows(
    records: Sequence[Mapping[str, Any]], class_names: Sequence[str]
) -> list[dict[str, Any]]:
    """Rows of the per-subject scores (``subject`` + :func:`score_columns`), sorted by subject:
    :func:`per_subject_dice` and ``hd95_<c>``."""
    return [_row(r, class_names, hd95=True) for r in sorted(records, key=lambda r: str(r["subject"]))]


def _mean(rows: Sequence[Mapping[str, float]], key: str) -> float | None:
    values = [r[key] for r in rows if not math.isnan(r[key])]
    return sum(values) / len(values) if values else None


def _dice_means(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> dict[str, float | None]:
    return {**{c: _mean(rows, f"dice_{c}") for c in class_names}, "mean": _mean(rows, "dice_mean")}


def dice_summary(records: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> dict[str, float | None]:
    """``{<c>: mean Dice, …, "mean": mean over subjects of the per-subject mean}`` over the
    records' ``dice_<c>`` alone (NaN left out, ``None`` for no subject): the ``dice`` part of
    :func:`summarise`, for scores without HD95 (a learning-curve point)."""
    return _dice_means(per_subject_dice(records, class_names), class_names)


def summarise(
    records: Sequence[Mapping[str, Any]], class_names: Sequence[str], convention: str = "brats2018"
) -> dict[str, Any]:
    """The test summary: ``{"n", "dice": {<c>…, "mean"}, "hd95": {<c>…}}``, means over subjects
    (``None`` for no subject). ``dice.mean`` is the mean over subjects of the per-subject mean.

    NaN scores (under ``convention="brats2023"``, a class empty in both maps) are left out of
    each mean, and for that convention ``"n_empty": {<c>: k}`` counts the subjects left out per
    class. Under ``"brats2018"`` no score is NaN and the summary has no ``n_empty``.
    """
    rows = per_subject_rows(records, class_names)
    summary: dict[str, Any] = {
        "n": len(rows),
        "dice": _dice_means(rows, class_names),
        "hd95": {c: _mean(rows, f"hd95_{c}") for c in class_names},
    }
    if convention == "brats2023":
        summary["n_empty"] = {c: sum(math.isnan(r[f"dice_{c}"]) for r in rows) for c in class_names}
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """One line of a test summary: Dice per class and mean, HD95 per class, n (and, under the
    brats2023 convention, the subjects left out per class as empty in both maps)."""

    def num(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    dice = ", ".join(f"{k} {num(v, '.3f')}" for k, v in summary["dice"].items())
    hd95 = ", ".join(f"{k} {num(v, '.1f')}" for k, v in summary["hd95"].items())
    empty = summary.get("n_empty")
    dropped = f"; empty in both, left out: {', '.join(f'{k} {v}' for k, v in empty.items())}" if empty else ""
    return f"Dice {dice}; HD95 {hd95} mm (n={summary['n']}{dropped})"


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def write_scores(
    csv_path: Path,
    summary_path: Path,
    records: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    convention: str = "brats2018",
) -> dict[str, Any]:
    """Write the per-subject scores (``subject`` + :func:`score_columns`, sorted by subject) as CSV
    and then their :func:`summarise` (under ``convention``) as JSON, each atomically; return the
    summary."""
    from tmerge.io import write_json, write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["subject", *score_columns(class_names)], lineterminator="\n")
    writer.writeheader()
    writer.writerows(per_subject_rows(records, class_names))
    write_text(csv_path, buf.getvalue())
    summary = summarise(records, class_names, convention)
    write_json(summary_path, summary)
    return summary


def record_count(record: Mapping[str, Any], key: str) -> float:
    """A voxel count ``key`` (``truth_<c>``/``pred_<c>``) of a per-subject record, checked: present,
    finite and >= 0 (ValueError naming the subject otherwise)."""
    try:
        value = float(record[key])
    except KeyError:
        raise ValueError(f"record {record.get('subject', '?')} has no {key}") from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"record {record.get('subject', '?')}: {key} must be a count >= 0, got {value}")
    return value


def regions_columns(classes: Sequence[str]) -> list[str]:
    """Columns of :data:`tmerge.runs.REGIONS_FILE` after ``subject``: ``truth_<c>…, pred_<c>…``."""
    return [*(f"truth_{c}" for c in classes), *(f"pred_{c}" for c in classes)]


def regions_csv(records: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> str:
    """The text of :data:`tmerge.runs.REGIONS_FILE`: ``subject`` and :func:`regions_columns`, one
    row per record (each with ``subject`` and the counts), sorted by subject."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    columns = regions_columns(classes)
    writer.writerow(["subject", *columns])
    for r in sorted(records, key=lambda r: str(r["subject"])):
        writer.writerow([str(r["subject"]), *(int(record_count(r, c)) for c in columns)])
    return buf.getvalue()
