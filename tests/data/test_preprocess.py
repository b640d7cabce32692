"""Preprocessing: normalisation, cropping to a multiple of the network's divisor, uncrop, N4, the per-subject cache."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import tmerge.data.cache as pc
import tmerge.data.preprocess as pp
from tmerge.data.cache import is_cached, preprocess_cached
from tmerge.data.geometry import uncrop
from tmerge.data.labels import aseg_to_paper
from tmerge.data.preprocess import PreprocessSettings, n4_correct, preprocess_subject

SHAPE = (30, 28, 26)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _ellipsoid(
    shape: tuple[int, ...], radii: tuple[float, ...], centre: tuple[float, ...] | None = None
) -> np.ndarray:
    centre = centre or tuple(n / 2 for n in shape)
    grid = np.indices(shape).astype(float)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) < 1


def _write_subject(
    folder: Path, scale: float = 1.0, seed: int = 0
) -> tuple[dict[str, Path], Path, np.ndarray]:
    """Two modalities and an aseg map of an off-centre ellipsoidal 'brain' (``SHAPE``)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    brain = _ellipsoid(SHAPE, (9, 8, 7), (13, 15, 12))
    aseg = np.where(brain, rng.choice([2, 3, 17, 24, 1002], size=SHAPE), 0).astype(np.int32)
    files = {}
    for name, offset in (("T1", 50.0), ("T2", 80.0)):
        data = np.where(brain, scale * (offset + 10 * (aseg % 7) + rng.normal(0, 3, SHAPE)), 0).astype(
            np.float32
        )
        files[name] = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, AFFINE), files[name])
    label = folder / "aparc+aseg.nii.gz"
    nib.save(nib.Nifti1Image(aseg, AFFINE), label)
    return files, label, aseg


def test_output_is_brain_normalised_and_a_multiple_of_16(tmp_path: Path) -> None:
    files, label, aseg = _write_subject(tmp_path)
    out = preprocess_subject(files, label, "hcp", PreprocessSettings(multiple=16, min_size=16), subject="s1")
    assert out.image.dtype == np.float32 and out.image.shape[0] == 2
    assert all(n % 16 == 0 and n >= 16 for n in out.image.shape[1:])
    assert out.label is not None and out.label.shape == out.image.shape[1:]
    brain = out.image[0] > 0
    assert out.image.min() >= 0 and out.image.max() <= 1
    # Histogram equalisation spreads the brain uniformly over [0, 1].
    assert abs(out.image[0][brain].mean() - 0.5) < 0.05
    assert set(np.unique(out.label)) <= set(range(15))
    # Brain wider than 16 along the first axis → padded to 32; min_size 48 → everything 48.
    big = preprocess_subject(files, label, "hcp", PreprocessSettings(min_size=48))
    assert big.image.shape[1:] == (48, 48, 48)


def test_histogram_normalisation_removes_a_global_intensity_scale(tmp_path: Path) -> None:
    files_a, label_a, _ = _write_subject(tmp_path / "a", scale=1.0)
    files_b, label_b, _ = _write_subject(tmp_path / "b", scale=7.5)
    a = preprocess_subject(files_a, label_a, "hcp", PreprocessSettings(min_size=16))
    b = preprocess_subject(files_b, label_b, "hcp", PreprocessSettings(min_size=16))
    assert np.abs(a.image - b.image).max() < 0.02


def test_uncrop_restores_the_original_geometry(tmp_path: Path) -> None:
    files, label, aseg = _write_subject(tmp_path)
    out = preprocess_subject(files, label, "hcp", PreprocessSettings(min_size=16))
    assert out.meta["original_shape"] == list(SHAPE)
    assert np.allclose(out.meta["affine"], AFFINE)
    restored = uncrop(out.label, out.meta)
    assert restored.shape == SHAPE and np.array_equal(restored, aseg_to_paper(aseg))
    # Leading axes (channels) are carried along.
    assert uncrop(out.image, out.meta).shape == (2, *SHAPE)
    with pytest.raises(ValueError, match="expected an array ending in"):
        uncrop(np.zeros((5, 5, 5)), out.meta)


def test_n4_reduces_a_synthetic_bias_field() -> None:
    shape = (32, 32, 32)
    rng = np.random.default_rng(0)
    brain = _ellipsoid(shape, (14, 13, 12))
    grid = np.indices(shape) / 31.0
    bias = np.exp(0.5 * (grid[0] - 0.5) + 0.3 * (grid[1] - 0.5))
    tissue = np.where(grid[2] > 0.5, 100.0, 60.0)
    volume = np.where(brain, tissue * bias * (1 + rng.normal(0, 0.02, shape)), 0).astype(np.float32)

    def spread(v: np.ndarray) -> float:
        # Coefficient of variation inside one homogeneous tissue: the bias inflates it.
        region = brain & (grid[2] > 0.6)
        return float(v[region].std() / v[region].mean())

    corrected = n4_correct(volume, brain, spacing=(3.0, 3.0, 3.0))
    assert corrected.shape == shape and corrected.dtype == np.float32
    assert np.all(corrected[~brain] == 0) and np.isfinite(corrected).all()
    assert spread(corrected) < 0.6 * spread(volume)


def test_brats_pipeline_with_n4(tmp_path: Path) -> None:
    files, _, _ = _write_subject(tmp_path)
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[12:15, 13:17, 10:13] = 2
    seg[13, 14:16, 11] = 1
    seg[13, 15, 11] = 4
    nib.save(nib.Nifti1Image(seg, AFFINE), tmp_path / "seg.nii.gz")
    out = preprocess_subject(
        files, tmp_path / "seg.nii.gz", "brats", PreprocessSettings(n4=True, min_size=16)
    )
    assert np.isfinite(out.image).all() and out.image.max() <= 1
    assert np.array_equal(uncrop(out.label, out.meta), seg)


def test_cache_hit_skips_work_and_changes_miss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files, label, _ = _write_subject(tmp_path / "raw")
    settings = PreprocessSettings(min_size=16)
    calls: list[str] = []
    real = pp.preprocess_subject

    def counting(*args: object, **kwargs: object) -> pp.Preprocessed:
        calls.append("run")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pc, "preprocess_subject", counting)
    cache = tmp_path / "cache"
    first = preprocess_cached("s1", files, label, "hcp", settings, cache)
    assert calls == ["run"]
    [written] = list(cache.glob("*/s1.npz"))
    assert written.parent.parent == cache

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("cache hit expected")

    monkeypatch.setattr(pc, "preprocess_subject", fail)
    hit = preprocess_cached("s1", files, label, "hcp", settings, cache)
    assert np.array_equal(hit.image, first.image) and np.array_equal(hit.label, first.label)
    assert hit.meta == first.meta
    assert is_cached("s1", files, label, "hcp", settings, cache)
    assert not is_cached("s2", files, label, "hcp", settings, cache)

    monkeypatch.setattr(pc, "preprocess_subject", counting)
    # Changed settings → another cache folder, recomputed.
    preprocess_cached("s1", files, label, "hcp", PreprocessSettings(min_size=32), cache)
    assert calls == ["run", "run"] and len(list(cache.glob("*/s1.npz"))) == 2
    # A touched input file → recomputed.
    stat = files["T1"].stat()
    os.utime(files["T1"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    preprocess_cached("s1", files, label, "hcp", settings, cache)
    assert len(calls) == 3
    # A damaged cache file → recomputed, not an error.
    written.write_bytes(b"not a zip")
    preprocess_cached("s1", files, label, "hcp", settings, cache)
    assert len(calls) == 4
    assert not list(cache.glob("*/.*.tmp"))
