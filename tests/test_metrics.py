"""Dice of hard predictions, in both output conventions, and HD95, on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from tmerge.metrics import (
    PerClassMean,
    dice_masks,
    dice_per_class,
    hd95_masks,
    logits_to_onehot,
    max_distance,
)
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


def test_sigmoid_dice_ce_uses_a_binary_cross_entropy_per_region():
    """Nested regions (ET ⊂ TC ⊂ WT) overlap: the CE term must be a per-voxel, per-region BCE,
    computed here by hand, not a softmax CE across regions."""
    logits = torch.randn(2, 3, 4, 4, 4)
    masks = (torch.rand(2, 3, 4, 4, 4) > 0.5).float()
    p = torch.sigmoid(logits)
    bce = -(masks * torch.log(p) + (1 - masks) * torch.log(1 - p)).mean()
    inter = (p * masks).sum(dim=(0, 2, 3, 4))
    dice = 1 - (2 * inter + 1e-5) / (p.sum(dim=(0, 2, 3, 4)) + masks.sum(dim=(0, 2, 3, 4)) + 1e-5)
    expected = dice.mean() + bce
    torch.testing.assert_close(build_loss("dice_ce", "sigmoid")(logits, masks), expected)


# ---- Dice and HD95 of hard masks (test-set scoring) -------------------------------------------


def _cube(shape, start, size):
    """``(1, 1, *shape)`` mask with a cube of edge ``size`` at ``start``."""
    mask = torch.zeros(1, 1, *shape)
    x, y, z = start
    mask[0, 0, x : x + size, y : y + size, z : z + size] = 1
    return mask


def test_hd95_of_single_voxels_is_their_distance_in_mm():
    pred = torch.zeros(1, 1, 8, 8, 8)
    truth = torch.zeros(1, 1, 8, 8, 8)
    pred[0, 0, 1, 2, 2] = 1
    truth[0, 0, 4, 2, 2] = 1  # 3 voxels apart along the first axis
    assert hd95_masks(pred, truth).item() == pytest.approx(3.0)
    assert hd95_masks(pred, truth, spacing=(2.0, 1.0, 1.0)).item() == pytest.approx(6.0)
    assert hd95_masks(pred, truth, spacing=(1.0, 5.0, 5.0)).item() == pytest.approx(3.0)


def test_hd95_of_a_cube_shifted_by_one_voxel():
    # 20 of the 56 surface voxels of a 4³ cube move by one voxel: more than 5 %, so HD95 = 1 voxel.
    pred = _cube((10, 10, 10), (2, 3, 3), 4)
    truth = _cube((10, 10, 10), (3, 3, 3), 4)
    assert hd95_masks(pred, truth).item() == pytest.approx(1.0)
    assert hd95_masks(pred, truth, spacing=(3.0, 1.0, 1.0)).item() == pytest.approx(3.0)
    assert hd95_masks(truth, truth).item() == 0.0
    # Dice: |P ∩ T| = 3·16 = 48 of 64 + 64 voxels → 0.75
    assert dice_masks(pred, truth).item() == pytest.approx(0.75)


def test_empty_masks_follow_brats():
    """Both empty: Dice 1, HD95 0; one empty (missed or hallucinated region): Dice 0 and HD95 the
    volume's diagonal in mm, the largest distance possible (BraTS: 373.13 mm)."""
    empty = torch.zeros(1, 1, 6, 8, 10)
    full = _cube((6, 8, 10), (1, 1, 1), 3)
    spacing = (1.0, 2.0, 3.0)
    diagonal = math.sqrt(6**2 + 16**2 + 30**2)
    assert dice_masks(empty, empty).item() == 1.0
    assert hd95_masks(empty, empty, spacing).item() == 0.0
    for pred, truth in ((empty, full), (full, empty)):
        assert dice_masks(pred, truth).item() == 0.0
        assert hd95_masks(pred, truth, spacing).item() == pytest.approx(diagonal)
    assert max_distance((240, 240, 155), (1.0, 1.0, 1.0)) == pytest.approx(373.13, abs=0.005)


def test_hd95_per_sample_and_class_and_bad_input():
    pred = torch.cat([_cube((8, 8, 8), (1, 1, 1), 3), torch.zeros(1, 1, 8, 8, 8)], dim=1)
    truth = torch.cat([_cube((8, 8, 8), (1, 1, 1), 3), _cube((8, 8, 8), (2, 2, 2), 2)], dim=1)
    hd = hd95_masks(pred.numpy().astype(bool), truth.numpy().astype(bool))  # numpy input works too
    assert (
        hd.shape == (1, 2) and hd[0, 0] == 0 and hd[0, 1] == pytest.approx(max_distance((8, 8, 8), (1, 1, 1)))
    )
    with pytest.raises(ValueError, match="spacing"):
        hd95_masks(pred, truth, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="one shape"):
        dice_masks(pred, truth[:, :1])
