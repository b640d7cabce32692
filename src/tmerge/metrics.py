"""Segmentation metrics: MONAI computes, torchmetrics aggregates (and syncs across DDP ranks).

Two output conventions run through the whole code base:

* ``"softmax"`` (parcellation): logits ``(B, K+1, D, H, W)`` including background; targets are
  class indices ``(B, 1, D, H, W)``; Dice is reported for the K foreground classes.
* ``"sigmoid"`` (BraTS regions ET/TC/WT): logits ``(B, R, D, H, W)``; targets are region masks
  ``(B, R, D, H, W)`` in {0, 1}; Dice is reported per region.

The test set is scored on hard masks in the subjects' original geometry (:mod:`tmerge.evaluate`)
with :func:`dice_masks` and :func:`hd95_masks`. Empty masks follow the BraTS evaluation:

============================ ======== ==============================================
truth / prediction            Dice     HD95
============================ ======== ==============================================
both empty                    1        0
one of them empty             0        the volume's diagonal, :func:`max_distance`
                                       (373.13 mm for BraTS' 240×240×155 at 1 mm)
============================ ======== ==============================================

The diagonal is the largest distance two voxels of the image can have, so a missed (or a
hallucinated) region scores the worst possible finite HD95 instead of MONAI's NaN/inf, and
means over subjects stay finite — BraTS' own ranking does the same with 373.13 mm.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from torchmetrics import Metric

OUTPUT_MODES = ("softmax", "sigmoid")


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


def dice_masks(pred: torch.Tensor | np.ndarray, truth: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Dice of hard masks per sample and class (MONAI ``compute_dice``).

    Args:
        pred: ``(B, K, X, Y, Z)`` predicted masks (bool or {0, 1}).
        truth: ``(B, K, X, Y, Z)`` true masks, same shape.

    Returns:
        ``(B, K)`` float Dice: 1 where both masks are empty, 0 where exactly one is.
    """
    pred, truth = _as_float_masks(pred, truth)
    return compute_dice(pred, truth, include_background=True, ignore_empty=False)


def max_distance(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The diagonal of a volume of ``shape`` voxels of size ``spacing`` (mm): the largest distance
    possible in it, and the HD95 of an empty mask against a non-empty one (see module docstring).

    >>> round(max_distance((240, 240, 155), (1.0, 1.0, 1.0)), 2)  # BraTS
    373.13
    """
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True)))


def hd95_masks(
    pred: torch.Tensor | np.ndarray,
    truth: torch.Tensor | np.ndarray,
    spacing: Sequence[float] | None = None,
) -> torch.Tensor:
    """95th-percentile symmetric Hausdorff distance of hard masks (MONAI
    ``compute_hausdorff_distance`` with ``percentile=95``), in the units of ``spacing``.

    Args:
        pred: ``(B, K, X, Y, Z)`` predicted masks (bool or {0, 1}).
        truth: ``(B, K, X, Y, Z)`` true masks, same shape.
        spacing: Voxel size per spatial axis (mm); ``None``: 1 (distances in voxels).

    Returns:
        ``(B, K)`` float distances: 0 where both masks are empty, :func:`max_distance` of the
        volume where exactly one is (MONAI would give NaN/inf there).
    """
    pred, truth = _as_float_masks(pred, truth)
    spatial = pred.shape[2:]
    spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * len(spatial)
    if len(spacing) != len(spatial):
        raise ValueError(f"spacing has {len(spacing)} entries for {len(spatial)} spatial axes: {spacing}")
    has_pred = pred.flatten(2).any(dim=2)
    has_truth = truth.flatten(2).any(dim=2)
    out = torch.where(has_pred == has_truth, 0.0, max_distance(spatial, spacing)).float()
    both = (has_pred & has_truth).nonzero().tolist()
    for b, k in both:  # MONAI only where both masks have voxels; the rest is set above
        with warnings.catch_warnings():
            # MONAI 1.5+ passes its own deprecated `always_return_as_numpy` argument internally.
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
            hd = compute_hausdorff_distance(
                pred[b : b + 1, k : k + 1],
                truth[b : b + 1, k : k + 1],
                include_background=True,
                percentile=95,
                spacing=list(spacing),
            )
        out[b, k] = float(hd[0, 0])
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
            a :class:`~tmerge.data.labels.LabelScheme`'s ``masks`` of the label maps.
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


