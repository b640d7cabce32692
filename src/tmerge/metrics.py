"""Segmentation metrics: MONAI computes, torchmetrics aggregates (and syncs across DDP ranks).

Two output conventions run through the whole code base:

* ``"softmax"`` (parcellation): logits ``(B, K+1, D, H, W)`` including background; targets are
  class indices ``(B, 1, D, H, W)``; Dice is reported for the K foreground classes.
* ``"sigmoid"`` (BraTS regions ET/TC/WT): logits ``(B, R, D, H, W)``; targets are region masks
  ``(B, R, D, H, W)`` in {0, 1}; Dice is reported per region.

The test set is scored on hard masks in the subjects' original geometry (:mod:`tmerge.evaluate`)
with :func:`dice_masks` and :func:`hd95_masks`.

**HD95** — two definitions (``definition=``, :data:`HD95_DEFINITIONS`), both on the same
border-to-border distances (:func:`surface_distances`: MONAI's mask edges and Euclidean
distances in mm, from the voxel spacing):

* ``"pooled"`` (default): the 95th percentile of the distances of *both* directions pooled,
  ``percentile(d(P→T) ∪ d(T→P), 95)`` — medpy's ``hd95``, which the BraTS organisers' Hausdorff95
  tool and the current ``brats-evaluation`` package use, i.e. the leaderboard's number;
* ``"directed"``: the larger of the two directed 95th percentiles,
  ``max(percentile(d(P→T), 95), percentile(d(T→P), 95))`` — MONAI's
  ``compute_hausdorff_distance(percentile=95)``, and tmerge's HD95 before the pooled default.

They agree for symmetric errors and differ for one-sided ones: a missed satellite lesion adds
large distances to d(T→P) only; directed takes the 95th percentile of that direction alone,
pooled dilutes them with the (small) distances of the other direction, so pooled ≤ directed.

**Empty regions** — two conventions (``convention=``, :data:`EMPTY_CONVENTIONS`):

* ``"brats2018"`` (BraTS 2018–2021; the default): both masks empty → Dice 1, HD95 0; exactly one
  empty (a missed or a hallucinated region) → Dice 0, HD95 the volume's diagonal,
  :func:`max_distance` (373.13 mm for BraTS' 240×240×155 at 1 mm); both non-empty → computed,
  also when they do not overlap.
* ``"brats2023"`` (the current official BraTS package): both empty → Dice and HD95 NaN (the
  means over subjects leave them out and count them); no overlap (one empty, or both non-empty
  and disjoint) → Dice 0, HD95 :data:`BRATS2023_PENALTY` (373.13 mm, whatever the image's size);
  overlapping → computed.

Under brats2018 the diagonal is the largest distance two voxels of the image can have, so a
missed (or a hallucinated) region scores the worst possible finite HD95 instead of MONAI's
NaN/inf, and means over subjects stay finite. On BraTS' own grid that is the 373.13 mm brats2023
uses everywhere; on a smaller image (the embedded 64³ at 3 mm: 332.6 mm) the two differ.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice
from monai.metrics.utils import get_edge_surface_distance
from torchmetrics import Metric

OUTPUT_MODES = ("softmax", "sigmoid")

#: The HD95 definitions of :func:`hd95_masks` (module docstring).
HD95_DEFINITIONS = ("pooled", "directed")

#: The empty-region conventions of :func:`dice_masks` and :func:`hd95_masks` (module docstring).
EMPTY_CONVENTIONS = ("brats2018", "brats2023")


def check_output_mode(mode: str) -> str:
    """Return ``mode`` if it is a known output convention, else raise ``ValueError`` naming it."""
    if mode not in OUTPUT_MODES:
        raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {mode!r}")
    return mode


def logits_to_onehot(logits: torch.Tensor, mode: str) -> torch.Tensor:
    """Hard prediction as a one-hot / multi-hot float tensor of the logits' shape ``(B, C, ...)``."""
    if check_output_mode(mode) == "softmax":
        index = logits.argmax(dim=1, keepdim=True)
        return torch.zeros_like(logits).scatter_(1, index, 1.0)
    return (logits > 0).to(logits.dtype)  # sigmoid(x) > 0.5  <=>  x > 0


def target_to_onehot(target: torch.Tensor, n_channels: int, mode: str) -> torch.Tensor:
    """Target as one-hot ``(B, n_channels, ...)``: class indices are expanded, masks pass through."""
    if check_output_mode(mode) == "softmax":
        index = target.long()
        if index.ndim >= 2 and index.shape[1] == 1:
            index = index[:, 0]
        return torch.nn.functional.one_hot(index, n_channels).movedim(-1, 1).float()
    return target.float()


def dice_per_class(logits: torch.Tensor, target: torch.Tensor, mode: str) -> torch.Tensor:
    """Dice of the hard prediction per sample and foreground class.

    Args:
        logits: ``(B, C, D, H, W)`` network output.
        target: ``(B, 1, D, H, W)`` class indices (softmax) or ``(B, C, D, H, W)`` masks (sigmoid).
        mode: ``"softmax"`` or ``"sigmoid"``.

    Returns:
        ``(B, K)`` Dice in [0, 1]; K = C - 1 for softmax (background left out), C for sigmoid.
        A class absent from both prediction and target scores 1 (BraTS convention), absent from
        the target but predicted scores 0.
    """
    pred = logits_to_onehot(logits, mode)
    truth = target_to_onehot(target, logits.shape[1], mode)
    return compute_dice(pred, truth, include_background=(mode == "sigmoid"), ignore_empty=False)


def check_hd95_definition(definition: str) -> str:
    """Return ``definition`` if it is one of :data:`HD95_DEFINITIONS`, else raise ``ValueError``."""
    if definition not in HD95_DEFINITIONS:
        raise ValueError(f"hd95 must be one of {HD95_DEFINITIONS}, got {definition!r}")
    return definition


def check_convention(convention: str) -> str:
    """Return ``convention`` if it is one of :data:`EMPTY_CONVENTIONS`, else raise ``ValueError``."""
    if convention not in EMPTY_CONVENTIONS:
        raise ValueError(f"convention must be one of {EMPTY_CONVENTIONS}, got {convention!r}")
    return convention


def dice_masks(
    pred: torch.Tensor | np.ndarray, truth: torch.Tensor | np.ndarray, convention: str = "brats2018"
) -> torch.Tensor:
    """Dice of hard masks per sample and class (MONAI ``compute_dice``).

    Args:
        pred: ``(B, K, X, Y, Z)`` predicted masks (bool or {0, 1}).
        truth: ``(B, K, X, Y, Z)`` true masks, same shape.
        convention: ``"brats2018"`` or ``"brats2023"`` (module docstring).

    Returns:
        ``(B, K)`` float Dice: 0 where exactly one mask is empty; where both are, 1
        (brats2018) or NaN (brats2023).
    """
    check_convention(convention)
    pred, truth = _as_float_masks(pred, truth)
    dice = compute_dice(pred, truth, include_background=True, ignore_empty=False)
    if convention == "brats2023":
        both_empty = ~pred.flatten(2).any(dim=2) & ~truth.flatten(2).any(dim=2)
        dice = torch.where(both_empty, torch.full_like(dice, math.nan), dice)
    return dice


def max_distance(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The diagonal of a volume of ``shape`` voxels of size ``spacing`` (mm): the largest distance
    possible in it, and the HD95 of an empty mask against a non-empty one (see module docstring).

    >>> round(max_distance((240, 240, 155), (1.0, 1.0, 1.0)), 2)  # BraTS
    373.13
    """
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True)))


#: BraTS 2023's HD95 of a region without overlap (mm, whatever the image): the diagonal of
#: BraTS' 240×240×155 grid at 1 mm, 373.1287.
BRATS2023_PENALTY = max_distance((240, 240, 155), (1.0, 1.0, 1.0))


def surface_distances(
    pred: torch.Tensor | np.ndarray, truth: torch.Tensor | np.ndarray, spacing: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Border-to-border distances of two non-empty masks, both directions (MONAI).

    A border voxel is a voxel of the mask with one of its 6 face neighbours outside the mask (or
    outside the image): the mask minus its binary erosion, as medpy and MONAI take it. Each
    border voxel of one mask gets the Euclidean distance, in the units of ``spacing``, to the
    nearest border voxel of the other (MONAI ``get_edge_surface_distance``).

    Args:
        pred: ``(X, Y, Z)`` (any number of axes) predicted mask, not empty.
        truth: true mask of the same shape, not empty.
        spacing: voxel size per axis.

    Returns:
        ``(d(P→T), d(T→P))``: float32 tensors ``(N_P,)`` and ``(N_T,)``, one distance per border
        voxel of the prediction and of the truth.
    """
    pred, truth = torch.as_tensor(pred) > 0, torch.as_tensor(truth) > 0
    if pred.shape != truth.shape or len(spacing) != pred.ndim:
        raise ValueError(
            f"surface_distances: masks {tuple(pred.shape)} and {tuple(truth.shape)} with spacing {tuple(spacing)}; "
            "expected one shape and one spacing per axis"
        )
    if not (pred.any() and truth.any()):
        raise ValueError(
            "surface_distances: both masks must be non-empty (an empty one is a convention's case)"
        )
    with warnings.catch_warnings():
        # MONAI 1.5+ passes its own deprecated `always_return_as_numpy` argument internally.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        _, (to_truth, to_pred), _ = get_edge_surface_distance(
            pred, truth, distance_metric="euclidean", spacing=[float(s) for s in spacing], symmetric=True
        )
    return torch.as_tensor(to_truth, dtype=torch.float32), torch.as_tensor(to_pred, dtype=torch.float32)


def hd95_of_distances(
    pred_to_truth: torch.Tensor, truth_to_pred: torch.Tensor, definition: str = "pooled"
) -> float:
    """HD95 from the two directions' border distances (:func:`surface_distances`).

    Percentiles interpolate linearly between order statistics (numpy's and medpy's default), in
    float32 as MONAI does.

    Args:
        pred_to_truth: ``(N_P,)`` distances from the prediction's border to the truth's.
        truth_to_pred: ``(N_T,)`` distances from the truth's border to the prediction's.
        definition: ``"pooled"``: the 95th percentile of all N_P + N_T distances (medpy, BraTS);
            ``"directed"``: the larger of the two directions' 95th percentiles (MONAI).
    """
    check_hd95_definition(definition)
    if pred_to_truth.numel() == 0 or truth_to_pred.numel() == 0:
        raise ValueError(
            f"hd95_of_distances: expected distances in both directions, got {pred_to_truth.numel()} "
            f"and {truth_to_pred.numel()}"
        )
    a, b = pred_to_truth.float().flatten(), truth_to_pred.float().flatten()
    if definition == "pooled":
        return _percentile95(torch.cat([a, b]))
    return max(_percentile95(a), _percentile95(b))


#: The most elements ``torch.quantile`` takes.
_QUANTILE_LIMIT = 2**24


def _percentile95(x: torch.Tensor) -> float:
    """The 95th percentile of a 1-D float32 tensor, interpolating linearly: ``torch.quantile``
    (MONAI's) up to its size limit, numpy beyond (both directions of two large, ragged masks can
    hold more border voxels than it takes)."""
    if x.numel() <= _QUANTILE_LIMIT:
        return float(torch.quantile(x, 0.95))
    return float(np.float32(np.percentile(x.numpy(), 95)))


def hd95_masks(
    pred: torch.Tensor | np.ndarray,
    truth: torch.Tensor | np.ndarray,
    spacing: Sequence[float] | None = None,
    definition: str = "pooled",
    convention: str = "brats2018",
) -> torch.Tensor:
    """95th-percentile Hausdorff distance of hard masks, in the units of ``spacing``.

    Args:
        pred: ``(B, K, X, Y, Z)`` predicted masks (bool or {0, 1}).
        truth: ``(B, K, X, Y, Z)`` true masks, same shape.
        spacing: Voxel size per spatial axis (mm); ``None``: 1 (distances in voxels).
        definition: ``"pooled"`` (BraTS/medpy) or ``"directed"`` (MONAI); see
            :func:`hd95_of_distances` and the module docstring.
        convention: Empty-region rules, ``"brats2018"`` or ``"brats2023"`` (module docstring).

    Returns:
        ``(B, K)`` float32 distances. brats2018: 0 where both masks are empty, :func:`max_distance`
        of the volume where exactly one is (MONAI would give NaN/inf there). brats2023: NaN where
        both are empty, :data:`BRATS2023_PENALTY` where the masks do not overlap.
    """
    check_hd95_definition(definition)
    check_convention(convention)
    pred, truth = _as_float_masks(pred, truth)
    spatial = pred.shape[2:]
    spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * len(spatial)
    if len(spacing) != len(spatial):
        raise ValueError(f"spacing has {len(spacing)} entries for {len(spatial)} spatial axes: {spacing}")
    has_pred = pred.flatten(2).any(dim=2)
    has_truth = truth.flatten(2).any(dim=2)
    if convention == "brats2018":
        out = torch.where(has_pred == has_truth, 0.0, max_distance(spatial, spacing)).float()
        computed = has_pred & has_truth
    else:
        overlap = (pred * truth).flatten(2).any(dim=2)
        out = torch.where(has_pred | has_truth, BRATS2023_PENALTY, math.nan).float()
        computed = overlap
    for b, k in computed.nonzero().tolist():  # distances only where the convention computes them
        out[b, k] = hd95_of_distances(*surface_distances(pred[b, k], truth[b, k], spacing), definition)
    return out


def _as_float_masks(
    pred: torch.Tensor | np.ndarray, truth: torch.Tensor | np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    pred, truth = torch.as_tensor(pred), torch.as_tensor(truth)
    if pred.shape != truth.shape or pred.ndim < 3:
        raise ValueError(
            f"expected masks of one shape (B, K, X, ...), got {tuple(pred.shape)} and {tuple(truth.shape)}"
        )
    return (pred > 0).float(), (truth > 0).float()


class PerClassMean(Metric):
    """Running mean of a ``(B, K)`` score tensor over samples, per class, synced across ranks.

    Args:
        n_classes: K, the number of score columns.
    """

    full_state_update = False

    def __init__(self, n_classes: int) -> None:
        super().__init__()
        if n_classes < 1:
            raise ValueError(f"n_classes must be >= 1, got {n_classes}")
        self.add_state("total", default=torch.zeros(n_classes, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor) -> None:
        """Add a ``(B, K)`` batch of per-sample scores."""
        self.total += scores.detach().to(torch.float64).sum(dim=0)
        self.count += scores.shape[0]

    def compute(self) -> torch.Tensor:
        """``(K,)`` mean score per class (NaN before any update)."""
        return (self.total / self.count).float()


def voxel_counts(pred: np.ndarray, truth: np.ndarray, classes: Sequence[str]) -> dict[str, int]:
    """``{"truth_<c>": …, "pred_<c>": …}``: the voxels of each class in the truth and the prediction.

    Args:
        pred, truth: ``(K, ...)`` masks of the K scored classes (non-zero = in the class), e.g.
            a :class:`~tmerge.data.schemes.LabelScheme`'s ``masks`` of the label maps.
        classes: the K class names, in the masks' order.

    Raises:
        ValueError: masks of different shapes, or not K of them.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape or pred.shape[:1] != (len(classes),):
        raise ValueError(
            f"voxel_counts: expected two ({len(classes)}, ...) masks, got {pred.shape} and {truth.shape}"
        )
    k = len(classes)
    t = np.count_nonzero(truth.reshape(k, -1), axis=1)
    p = np.count_nonzero(pred.reshape(k, -1), axis=1)
    return {
        **{f"truth_{c}": int(v) for c, v in zip(classes, t, strict=True)},
        **{f"pred_{c}": int(v) for c, v in zip(classes, p, strict=True)},
    }


