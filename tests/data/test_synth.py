"""Tests of the template anatomy (``tmerge.data.synthetic.anatomy``) and the synthetic subjects
(``tmerge.data.synthetic.subjects``)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.anatomy import requires_anatomy

from tmerge.data.synthetic.anatomy import ASEG_LABELS, Anatomy, load_anatomy
from tmerge.data.synthetic.subjects import synth_brats_subject, synth_hcp_subject
from tmerge.data.synthetic.warp import smooth_noise

pytestmark = requires_anatomy


@pytest.fixture(scope="module")
def anat() -> Anatomy:
    return load_anatomy(32)


def test_anatomy_grid_and_contents(anat: Anatomy) -> None:
    assert load_anatomy(32) is anat  # cached per size
    assert anat.t1.shape == anat.aseg.shape == anat.mask.shape == (32, 32, 32)
    assert anat.tissue.shape == (3, 32, 32, 32)
    assert anat.t1.dtype == np.float32 and anat.tissue.dtype == np.float32 and anat.aseg.dtype == np.int16
    np.testing.assert_allclose(np.diag(anat.affine), [6.0, 6.0, 6.0, 1.0])
    assert 0.0 <= anat.t1.min() and anat.t1.max() == pytest.approx(1.0)
    assert not anat.t1[~anat.mask].any() and not anat.aseg[~anat.mask].any()
    np.testing.assert_allclose(anat.tissue.sum(axis=0)[anat.mask], 1.0, atol=1e-5)
    assert set(np.unique(anat.aseg).tolist()) <= set(ASEG_LABELS)
    # Brain volume of the MNI152 template (~1.85 l with CSF), so the world grids line up.
    assert 1.6 < anat.mask.sum() * 6.0**3 / 1e6 < 2.1
    with pytest.raises(ValueError):
        anat.t1[0, 0, 0] = 1.0  # shared cache: read-only


def test_anatomy_hemispheres_follow_world_coordinates(anat: Anatomy) -> None:
    # The templates' x axes are flipped differently; resampling through the affines must put
    # FreeSurfer's left structures (2-18) at negative RAS x and right ones (41-54) at positive x.
    def world_x(labels: tuple[int, ...]) -> float:
        idx = np.argwhere(np.isin(anat.aseg, labels)).mean(axis=0)
        return float((anat.affine @ np.r_[idx, 1.0])[0])

    assert world_x((2, 3)) < -10.0 < 10.0 < world_x((41, 42))
    # WM labels sit on high WM probability.
    wm = np.isin(anat.aseg, (2, 41))
    assert anat.tissue[1][wm].mean() > 0.6


def test_smooth_noise_is_unit_variance() -> None:
    field = smooth_noise(np.random.default_rng(0), 32, 4, n_fields=8)
    assert field.shape == (8, 32, 32, 32) and field.dtype == np.float32
    assert 0.6 < field.std() < 1.4


def test_hcp_subject(anat: Anatomy) -> None:
    a = synth_hcp_subject(anat, np.random.default_rng(1))
    b = synth_hcp_subject(anat, np.random.default_rng(1))
    c = synth_hcp_subject(anat, np.random.default_rng(2))
    for key in ("t1", "t2"):
        assert a[key].shape == (32, 32, 32) and a[key].dtype == np.float32
        assert not a[key][~a["mask"]].any()
        np.testing.assert_array_equal(a[key], b[key])
    assert a["aseg"].dtype == np.int16 and set(np.unique(a["aseg"]).tolist()) <= set(ASEG_LABELS)
    assert not a["aseg"][~a["mask"]].any()
    assert not np.array_equal(a["aseg"], c["aseg"])  # a different subject's shape
    # T2 contrast: CSF-filled ventricles brighter than cerebral WM (on average over subjects).
    ratios = []
    for seed in range(6):
        s = synth_hcp_subject(anat, np.random.default_rng(100 + seed), random_contrast_p=0.0)
        ratios.append(
            s["t2"][np.isin(s["aseg"], (4, 43))].mean() / s["t2"][np.isin(s["aseg"], (2, 41))].mean()
        )
    assert np.median(ratios) > 1.2


@pytest.mark.parametrize("grade", ["HGG", "LGG"])
def test_brats_subject(anat: Anatomy, grade: str) -> None:
    for seed in range(4):
        s = synth_brats_subject(anat, np.random.default_rng(seed), grade=grade)
        seg = s["seg"]
        assert seg.dtype == np.uint8 and set(np.unique(seg).tolist()) <= {0, 1, 2, 4}
        assert (seg > 0).any() and not seg[~s["mask"]].any()
        for m in ("t1", "t1ce", "t2", "flair"):
            assert s[m].shape == (32, 32, 32) and s[m].dtype == np.float32
            assert not s[m][~s["mask"]].any()
        # Unlabelled draws the same subject, only without its labels.
        u = synth_brats_subject(anat, np.random.default_rng(seed), grade=grade, labelled=False)
        assert u["seg"] is None
        np.testing.assert_array_equal(u["flair"], s["flair"])


def test_brats_tumour_is_visible_but_not_trivial(anat: Anatomy) -> None:
    # Over subjects, oedema is brighter than normal WM on FLAIR and the enhancing part brighter on
    # T1ce than on T1 (relative to WM) -- the physics the four contrasts are built from.
    flair_ratio, enh_gain = [], []
    for seed in range(8):
        s = synth_brats_subject(anat, np.random.default_rng(seed), grade="HGG")
        healthy = s["mask"] & (s["seg"] == 0)
        flair_ratio.append(s["flair"][s["seg"] == 2].mean() / s["flair"][healthy].mean())
        if (s["seg"] == 4).sum() >= 3:
            et = s["seg"] == 4
            enh_gain.append(
                s["t1ce"][et].mean() / s["t1ce"][healthy].mean()
                - s["t1"][et].mean() / s["t1"][healthy].mean()
            )
    assert np.median(flair_ratio) > 1.05
    assert enh_gain and np.median(enh_gain) > 0.1


def test_bad_grade(anat: Anatomy) -> None:
    with pytest.raises(ValueError, match="grade"):
        synth_brats_subject(anat, np.random.default_rng(0), grade="GBM")
