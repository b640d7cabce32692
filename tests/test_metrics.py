"""Dice of hard predictions, in both output conventions, on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from tmerge.metrics import PerClassMean, dice_per_class, logits_to_onehot
from tmerge.modules.segmentation import build_loss


def test_softmax_dice_by_hand():
    # 1×4×1 "volume", 3 classes. target: [0, 1, 1, 2]; prediction: [0, 1, 2, 2]
    target = torch.tensor([0, 1, 1, 2]).view(1, 1, 4, 1, 1)
    pred = torch.tensor([0, 1, 2, 2])
    logits = torch.nn.functional.one_hot(pred, 3).T.float().view(1, 3, 4, 1, 1) * 5
    dice = dice_per_class(logits, target, "softmax")
    # class 1: |P∩T| = 1, |P| = 1, |T| = 2 → 2/3; class 2: 1, 2, 1 → 2/3 (background left out)
    torch.testing.assert_close(dice, torch.tensor([[2 / 3, 2 / 3]]))


def test_sigmoid_dice_by_hand_and_empty_regions():
    target = torch.zeros(1, 2, 2, 2, 1)
    target[0, 0, 0, :, 0] = 1  # region 0: 2 voxels
    logits = torch.full((1, 2, 2, 2, 1), -5.0)
    logits[0, 0, :, 0, 0] = 5.0  # predicts 2 voxels, 1 of them right → Dice 0.5
    dice = dice_per_class(logits, target, "sigmoid")
    # region 1: empty in both → 1 (BraTS convention)
    torch.testing.assert_close(dice, torch.tensor([[0.5, 1.0]]))
    logits[0, 1, 0, 0, 0] = 5.0  # predicted where the target is empty → 0
    assert dice_per_class(logits, target, "sigmoid")[0, 1] == 0


def test_hard_prediction_and_unknown_mode():
    logits = torch.tensor([[[0.1], [2.0], [-1.0]]]).view(1, 3, 1)
    assert logits_to_onehot(logits, "softmax").view(-1).tolist() == [0.0, 1.0, 0.0]
    assert logits_to_onehot(logits, "sigmoid").view(-1).tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="output_mode"):
        logits_to_onehot(logits, "softmin")


def test_per_class_mean_over_samples():
    metric = PerClassMean(2)
    metric.update(torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
    metric.update(torch.tensor([[0.0, 1.0]]))
    torch.testing.assert_close(metric.compute(), torch.tensor([0.5, 0.5]))


def test_softmax_loss_equals_monai_one_hot_path_and_runs_under_vmap():
    from monai.losses import DiceLoss

    logits = torch.randn(2, 3, 4, 4, 4)
    target = torch.randint(0, 3, (2, 1, 4, 4, 4))
    ours = build_loss("dice", "softmax")
    reference = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
    torch.testing.assert_close(ours(logits, target), reference(logits, target))
    per_sample = torch.func.vmap(lambda x, y: ours(x[None], y[None]))(logits, target)
    torch.testing.assert_close(per_sample[0], ours(logits[:1], target[:1]))
