"""The shallow baseline: per-voxel features and an MLP that learns what intensities decide."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from tmerge.stages.shallow import fit_voxel_classifier, voxel_features


def test_voxel_features_are_the_channels_and_their_smoothed_copies():
    rng = np.random.default_rng(0)
    image = rng.random((2, 6, 7, 8)).astype(np.float32)
    feats = voxel_features(image, sigmas=(1.0,))
    assert feats.shape == (4, 6, 7, 8) and feats.dtype == np.float32
    assert np.array_equal(feats[:2], image)
    assert np.allclose(feats[3], ndimage.gaussian_filter(image[1], 1.0))


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_classifier_learns_an_intensity_rule(mode):
    """Known answer: class 1 where channel 0 > 0.6, class 2 where channel 1 > 0.7 (and not 1)."""
    rng = np.random.default_rng(1)
    x = rng.random((6000, 2)).astype(np.float32)
    labels = np.where(x[:, 0] > 0.6, 1, np.where(x[:, 1] > 0.7, 2, 0))
    targets = labels if mode == "softmax" else np.stack([labels == 1, labels == 2], axis=1).astype(np.uint8)
    net = fit_voxel_classifier(x, targets, mode, 3 if mode == "softmax" else 2, seed=0, steps=300)
    with torch.no_grad():
        out = net(torch.from_numpy(x))
    pred = out.argmax(1).numpy() if mode == "softmax" else np.where(out[:, 0] > 0, 1, np.where(out[:, 1] > 0, 2, 0))
    assert (pred == labels).mean() > 0.97


def test_noise_source_tensors_are_seeded_and_of_the_tensors_scale():
    from tmerge.stages.control import noise_like

    gen = torch.Generator().manual_seed(0)
    state = {"a": torch.randn(50, 40, generator=gen) * 3 + 1, "s": torch.ones(5)}
    one, two, other = noise_like(state, ["a"], 7), noise_like(state, ["a"], 7), noise_like(state, ["a"], 8)
    assert torch.equal(one["a"], two["a"]) and not torch.equal(one["a"], other["a"])
    assert one["s"] is state["s"]  # S untouched
    assert float(one["a"].std()) == pytest.approx(float(state["a"].std()), rel=0.05)
    assert float(one["a"].mean()) == pytest.approx(float(state["a"].mean()), abs=0.15)
    assert abs(float(torch.corrcoef(torch.stack([one["a"].flatten(), state["a"].flatten()]))[0, 1])) < 0.1
