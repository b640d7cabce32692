"""Segmentation metrics: MONAI computes, torchmetrics aggregates (and syncs across DDP ranks).

Two output conventions run through the whole code base:

* ``"softmax"`` (parcellation): logits ``(B, K+1, D, H, W)`` including background; targets are
  class indices ``(B, 1, D, H, W)``; Dice is reported for the K foreground classes.
* ``"sigmoid"`` (BraTS regions ET/TC/WT): logits ``(B, R, D, H, W)``; targets are region masks
  ``(B, R, D, H, W)`` in {0, 1}; Dice is reported per region.
"""

from __future__ import annotations

import torch
from monai.metrics import compute_dice
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
