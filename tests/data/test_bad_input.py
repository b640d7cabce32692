"""Bad input → one DataError naming the file (or folder) and what was expected."""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import trees

from tmerge.data import HCPDataModule, TargetDataModule
from tmerge.data.nifti import check_same_geometry, find_modality, load_labels, load_volume
from tmerge.errors import DataError

TRAIN = "MICCAI_BraTS_2018_Data_Training"
SUBJECT = "Brats18_TCIA1_101_1"  # an HGG subject of write_brats_tree


@pytest.fixture(scope="module")
def clean_brats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("clean_brats")
    trees.write_brats_tree(root, n_train=10, n_val=0)
    return root


@pytest.fixture
def brats(clean_brats: Path, tmp_path: Path) -> Path:
    """A fresh copy of the clean tree, for one test to break."""
    return Path(shutil.copytree(clean_brats, tmp_path / "brats"))


def _file(root: Path, modality: str) -> Path:
    return root / TRAIN / "HGG" / SUBJECT / f"{SUBJECT}_{modality}.nii.gz"


def _module(root: Path, tmp_path: Path, **kw: object) -> TargetDataModule:
    # 10 subjects: 4 test, 6 remain; 60 % of 10 → 6 drawn, so every subject is preprocessed.
    fields = {"test_size": 4, "pool_size": 10, "portion": 60, "n4": False, "patch_size": 16, **kw}
    return TargetDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), **fields)


def _prepare(root: Path, tmp_path: Path, **kw: object) -> str:
    with pytest.raises(DataError) as info:
        _module(root, tmp_path, **kw).prepare_data()
    return str(info.value)


def _rewrite(path: Path, change: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]) -> None:
    img = nib.load(path)
    data, affine = change(np.asarray(img.dataobj), img.affine)
    nib.save(nib.Nifti1Image(data, affine), path)


def test_clean_tree_prepares(brats: Path, tmp_path: Path) -> None:
    """The unbroken tree is the control: every subject the splits need is preprocessed and
    cached, so the errors below come from the one broken file each."""
    from tmerge.data.cache import is_cached

    dm = _module(brats, tmp_path)
    dm.prepare_data()
    needed = [s for part in ("train", "val", "test") for s in dm.subjects[part]]
    assert len(needed) == 10 and SUBJECT in needed
    assert all(is_cached(*dm._cache_args(s)) for s in needed)


def test_missing_modality(brats: Path, tmp_path: Path) -> None:
    _file(brats, "t2").unlink()
    message = _prepare(brats, tmp_path)
    assert f"{SUBJECT}_t2.nii.gz" in message and "not found" in message and ".nii" in message


def test_modalities_with_different_shapes(brats: Path, tmp_path: Path) -> None:
    _rewrite(_file(brats, "flair"), lambda d, a: (d[:-1], a))
    message = _prepare(brats, tmp_path)
    assert f"{SUBJECT}_flair.nii.gz" in message and f"{SUBJECT}_t1.nii.gz" in message and "shape" in message


def test_modalities_with_different_affines(brats: Path, tmp_path: Path) -> None:
    _rewrite(_file(brats, "t1ce"), lambda d, a: (d, a @ np.diag([1.0, 1.0, 1.1, 1.0])))
    message = _prepare(brats, tmp_path)
    assert f"{SUBJECT}_t1ce.nii.gz" in message and "affine" in message


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_image(brats: Path, tmp_path: Path, value: float) -> None:
    def poison(d: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = d.astype(np.float32)
        d[5, 5, 5] = value
        return d, a

    _rewrite(_file(brats, "t1"), poison)
    message = _prepare(brats, tmp_path)
    assert f"{SUBJECT}_t1.nii.gz" in message and "NaN or Inf" in message


def test_label_outside_brats_set(brats: Path, tmp_path: Path) -> None:
    def three(d: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d = d.copy()
        d[d == 1] = 3
        return d, a

    _rewrite(_file(brats, "seg"), three)
    message = _prepare(brats, tmp_path)
    assert f"{SUBJECT}_seg.nii.gz" in message and "{3}" in message and "0, 1, 2, 4" in message


def test_truncated_nifti(brats: Path, tmp_path: Path) -> None:
    path = _file(brats, "flair")
    path.write_bytes(path.read_bytes()[:300])
    message = _prepare(brats, tmp_path)
    assert f"{SUBJECT}_flair.nii.gz" in message and "not a readable NIfTI" in message


def test_truncated_nifti_is_reported_at_setup_too(brats: Path, tmp_path: Path) -> None:
    path = _file(brats, "t2")
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DataError, match=f"{SUBJECT}_t2.nii.gz"):
        _module(brats, tmp_path).setup()  # all parts: SUBJECT may be a test subject


def test_wrong_or_empty_root(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    message = _prepare(empty, tmp_path)
    assert str(empty) in message and "MICCAI_BraTS_2018_Data_Training/{HGG,LGG}/Brats18_<ID>" in message
    with pytest.raises(DataError, match="expected <root>/<subject>/T1w/T1w_acpc_dc_restore_brain.nii.gz"):
        HCPDataModule(root=str(empty), cache_dir=str(tmp_path / "c")).prepare_data()
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=f"{missing}: dataset folder not found"):
        HCPDataModule(root=str(missing)).setup("fit")


def test_hcp_missing_label_and_too_few_subjects(tmp_path: Path) -> None:
    root = tmp_path / "hcp"
    ids = trees.write_hcp_tree(root, n=58)
    for sid in ids:  # every subject is used by some split part; break them all
        (root / sid / "T1w" / "aparc+aseg.nii.gz").unlink()
    with pytest.raises(DataError, match=r"aparc\+aseg\.nii\.gz: file not found"):
        HCPDataModule(root=str(root), cache_dir=str(tmp_path / "c"), patch_size=16).prepare_data()
    shutil.rmtree(root / ids[0])
    with pytest.raises(DataError, match=f"found 57 HCP subjects in {root}"):
        HCPDataModule(root=str(root), cache_dir=str(tmp_path / "c")).prepare_data()


def test_portion_larger_than_pool(brats: Path, tmp_path: Path) -> None:
    message = _prepare(brats, tmp_path, portion=90)
    assert "needs 9 subjects" in message and "only 6 remain" in message and "larger than the pool" in message


def test_nifti_readers_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"gone\.nii\.gz: file not found"):
        load_volume(tmp_path / "gone.nii.gz")
    four_d = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), four_d)
    with pytest.raises(DataError, match=r"four_d\.nii\.gz: expected a 3-D volume, got shape \(4, 4, 4, 2\)"):
        load_volume(four_d)
    fractional = tmp_path / "frac.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 0.5, np.float32), np.eye(4)), fractional)
    with pytest.raises(DataError, match=r"frac\.nii\.gz: label map holds non-integer"):
        load_labels(fractional)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"definitely not nifti"))
    with pytest.raises(DataError, match=r"garbage\.nii\.gz: not a readable NIfTI"):
        load_volume(garbage)
    with pytest.raises(
        DataError, match=r"T1w\.nii\.gz: file not found \(expected T1w\.nii\.gz or T1w\.nii\)"
    ):
        find_modality(tmp_path, "T1w")
    with pytest.raises(DataError, match="subject s: b.nii has shape"):
        check_same_geometry({"a.nii": ((2, 2, 2), np.eye(4)), "b.nii": ((2, 2, 3), np.eye(4))}, "s")


# ---- blank modalities (issue 24) ------------------------------------------------------------------


def _brain_of(root: Path) -> np.ndarray:
    """SUBJECT's brain mask: the voxels where any modality is non-zero."""
    return np.any([np.asarray(nib.load(_file(root, m)).dataobj) != 0 for m in ("t1", "t1ce", "t2", "flair")], axis=0)


@pytest.mark.parametrize(("fill", "detail"), [(0.0, "(all zero)"), (7.0, "(constant 7 within the brain mask")])
def test_blank_modality_is_refused_naming_the_file(brats: Path, tmp_path: Path, fill: float, detail: str) -> None:
    """A modality with no signal (zero-filled, or one value on the whole brain) is almost always
    a conversion error: the subject is refused, its file named, and nothing is cached for it."""
    brain = _brain_of(brats)
    _rewrite(_file(brats, "t1"), lambda d, a: (np.where(brain, fill, 0).astype(np.float32), a))
    message = _prepare(brats, tmp_path)
    assert message.startswith(f"{_file(brats, 't1')} (subject {SUBJECT}): this modality is blank {detail}")
    assert "set data.allow_blank_modality=true to accept it" in message and "zero-fills" in message
    assert not list((tmp_path / "cache").rglob(f"{SUBJECT}.npz"))


def test_blank_modality_is_accepted_with_the_option(brats: Path, tmp_path: Path) -> None:
    """``allow_blank_modality=true`` (datasets that zero-fill missing sequences): the subject is
    preprocessed, the blank channel carries no signal, and it is cached apart from the default
    settings' caches, whose key does not change."""
    from tmerge.data.cache import cache_file
    from tmerge.data.preprocess import PreprocessSettings

    _rewrite(_file(brats, "t1"), lambda d, a: (np.zeros_like(d, dtype=np.float32), a))
    dm = _module(brats, tmp_path, allow_blank_modality=True)
    dm.prepare_data()
    settings = dm.preprocess_settings()
    assert settings.allow_blank_modality
    path = cache_file(tmp_path / "cache", settings, "brats", str(dm.root), SUBJECT)
    default = cache_file(tmp_path / "cache", PreprocessSettings(min_size=16), "brats", str(dm.root), SUBJECT)
    assert path.is_file() and path.parent != default.parent and not default.exists()
    with np.load(path) as npz:
        image = npz["image"]
    brain = np.any(image != 0, axis=0)
    t1 = image[0][brain]
    assert t1.min() == t1.max()  # one value on the whole brain: no signal, but finite
    assert _module(brats, tmp_path).preprocess_settings() == PreprocessSettings(min_size=16)


def test_all_zero_subject_is_named_as_such(brats: Path, tmp_path: Path) -> None:
    for m in ("t1", "t1ce", "t2", "flair"):
        _rewrite(_file(brats, m), lambda d, a: (np.zeros_like(d, dtype=np.float32), a))
    message = _prepare(brats, tmp_path)
    assert f"subject {SUBJECT}: " in message and "are all zero; expected skull-stripped brain images" in message


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_zero_byte_and_truncated_files_name_the_file(brats: Path, tmp_path: Path, suffix: str) -> None:
    gz = _file(brats, "t2")
    path = gz.with_name(gz.name.replace(".nii.gz", suffix))
    if suffix == ".nii":  # an uncompressed file in its place, truncated
        data = gz.read_bytes()
        gz.unlink()
        path.write_bytes(gzip.decompress(data)[:400])
    else:
        path.write_bytes(b"")
    message = _prepare(brats, tmp_path)
    assert str(path) in message and "not a readable NIfTI" in message
