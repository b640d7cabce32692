"""Tests of ``tmerge.data.synthetic``'s generator: layout, determinism, labels, idempotence, repairs, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers.anatomy import requires_anatomy
from scipy import ndimage

from tmerge.data.formats import BRATS2018_TRAINING as BRATS_TRAINING
from tmerge.data.formats import BRATS2018_VALIDATION as BRATS_VALIDATION
from tmerge.data.synthetic.anatomy import ASEG_LABELS
from tmerge.data.synthetic.generate import BRATS_VALIDATION_LABELS, generate_default
from tmerge.data.synthetic.ids import hcp_subject_ids
from tmerge.data.synthetic.manifest import MANIFEST_NAME, PENDING_NAME
from tmerge.errors import DataError

pytestmark = requires_anatomy

SMALL = {"size": 32, "seed": 3, "n_hcp": 3, "n_brats": 4, "n_brats_val": 2, "progress": False}
HCP_NAMES = ("T1w_acpc_dc_restore_brain.nii.gz", "T2w_acpc_dc_restore_brain.nii.gz", "aparc+aseg.nii.gz")


def _files(root: Path) -> dict[str, Path]:
    """Every regular file under ``root``, keyed by its relative POSIX path."""
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def _array(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _same_content(a: Path, b: Path) -> bool:
    """Same NIfTI arrays, dtypes and affines (gzip headers may differ in timestamps)."""
    ia, ib = nib.load(str(a)), nib.load(str(b))
    return (
        ia.get_data_dtype() == ib.get_data_dtype()
        and np.array_equal(ia.affine, ib.affine)
        and np.array_equal(np.asarray(ia.dataobj), np.asarray(ib.dataobj))
    )


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("default")
    written = generate_default(root, workers=1, **SMALL)
    assert written == {"hcp": 3, "brats": 6}
    return root


def test_layout_and_names(generated: Path) -> None:
    hcp = generated / "hcp"
    subjects = sorted(p.name for p in hcp.iterdir() if p.is_dir())
    assert subjects == hcp_subject_ids(SMALL["seed"], 3)
    assert all(len(s) == 6 and s.isdigit() for s in subjects) and len(set(subjects)) == 3
    for sid in subjects:
        assert sorted(p.name for p in (hcp / sid / "T1w").iterdir()) == sorted(HCP_NAMES)

    training = generated / "brats" / BRATS_TRAINING
    assert {p.name for p in training.iterdir()} <= {"HGG", "LGG"}
    train_ids = sorted(p.name for p in training.glob("*/*"))
    assert train_ids == [f"Brats18_SYN_{i:04d}_1" for i in range(1, 5)]
    for folder in training.glob("*/*"):
        sid = folder.name
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            f"{sid}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg")
        )
    validation = generated / "brats" / BRATS_VALIDATION
    val_ids = sorted(p.name for p in validation.iterdir())
    assert val_ids == ["Brats18_SYNV_0001_1", "Brats18_SYNV_0002_1"]
    for sid in val_ids:
        assert sorted(p.name for p in (validation / sid).iterdir()) == sorted(
            f"{sid}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")
        )

    for kind in ("hcp", "brats"):
        manifest = json.loads((generated / kind / MANIFEST_NAME).read_text())
        assert manifest["size"] == 32 and manifest["seed"] == 3 and manifest["kind"] == kind
        assert not (generated / kind / PENDING_NAME).exists()
    leftovers = [p for p in generated.rglob(".tmp-*")]
    assert leftovers == []


def test_validation_labels_are_held_out_beside_the_dataset(generated: Path) -> None:
    """The online validation set's label maps lie outside root/brats (no stage reads them), one
    per validation subject, BraTS-valued, inside the brain, on the subject's own grid."""
    labels = generated / BRATS_VALIDATION_LABELS
    names = sorted(p.name for p in labels.iterdir())
    assert names == ["Brats18_SYNV_0001_1_seg.nii.gz", "Brats18_SYNV_0002_1_seg.nii.gz"]
    assert not list((generated / "brats").rglob("*SYNV*_seg.nii.gz"))
    for name in names:
        sid = name.removesuffix("_seg.nii.gz")
        seg = nib.load(str(labels / name))
        flair = nib.load(str(generated / "brats" / BRATS_VALIDATION / sid / f"{sid}_flair.nii.gz"))
        assert seg.shape == flair.shape and np.array_equal(seg.affine, flair.affine)
        values = _array(labels / name)
        assert set(np.unique(values)) <= {0, 1, 2, 4}
        assert (values > 0).any() and not (values[np.asarray(flair.dataobj) == 0] > 0).any()


def test_modalities_share_shape_affine_and_dtypes(generated: Path) -> None:
    for folder in [
        *generated.glob("hcp/*/T1w"),
        *generated.glob("brats/*/*/*"),
        *generated.glob(f"brats/{BRATS_VALIDATION}/*"),
    ]:
        if not folder.is_dir() or folder.name in ("HGG", "LGG"):
            continue
        images = [nib.load(str(p)) for p in sorted(folder.glob("*.nii.gz"))]
        assert len(images) >= 3
        for img in images:
            assert img.shape == (32, 32, 32)
            np.testing.assert_array_equal(img.affine, images[0].affine)
            name = Path(img.get_filename()).name
            if name.endswith(("seg.nii.gz", "aparc+aseg.nii.gz")):
                assert np.issubdtype(img.get_data_dtype(), np.integer)
            else:
                assert img.get_data_dtype() == np.int16
    affine = images[0].affine
    np.testing.assert_allclose(np.diag(affine)[:3], [6.0, 6.0, 6.0])  # 192 mm / 32, RAS


def test_hcp_labels_and_background(generated: Path) -> None:
    for folder in generated.glob("hcp/*/T1w"):
        aseg = _array(folder / "aparc+aseg.nii.gz")
        assert set(np.unique(aseg).tolist()) <= set(ASEG_LABELS)
        assert (aseg > 0).sum() > 1000
        t1 = _array(folder / "T1w_acpc_dc_restore_brain.nii.gz")
        t2 = _array(folder / "T2w_acpc_dc_restore_brain.nii.gz")
        assert t1.min() >= 0 and t2.min() >= 0 and t1.max() > 200 and t2.max() > 200
        # Skull-stripped: nothing outside a 2-voxel margin around the labelled brain.
        near_brain = ndimage.binary_dilation(aseg > 0, iterations=2)
        assert not t1[~near_brain].any() and not t2[~near_brain].any()
        # And the labelled brain is imaged.
        assert (t1[aseg > 0] > 0).mean() > 0.95


def test_brats_labels_nested_and_inside_brain(generated: Path) -> None:
    grades = set()
    for seg_path in generated.glob(f"brats/{BRATS_TRAINING}/*/*/*_seg.nii.gz"):
        grades.add(seg_path.parent.parent.name)
        seg = _array(seg_path)
        assert set(np.unique(seg).tolist()) <= {0, 1, 2, 4}
        wt, tc, et = seg > 0, np.isin(seg, (1, 4)), seg == 4
        assert wt.any() and tc.any()
        assert not (et & ~tc).any() and not (tc & ~wt).any()
        flair = _array(seg_path.with_name(seg_path.name.replace("_seg", "_flair")))
        # The tumour lies inside the (skull-stripped) brain.
        brain = ndimage.binary_dilation(flair > 0, iterations=1)
        assert brain[wt].all()
    assert grades  # at least one grade folder used


def test_deterministic_parallel_and_subset(generated: Path, tmp_path: Path) -> None:
    # Same seed, parallel workers, fewer subjects: identical content for the common subjects.
    other = tmp_path / "parallel"
    generate_default(other, workers=2, **{**SMALL, "n_hcp": 2, "n_brats": 2, "n_brats_val": 1})
    a, b = _files(generated), _files(other)
    common = [k for k in b if k.endswith(".nii.gz")]
    assert len(common) == 2 * 3 + 2 * 5 + 4 + 1  # HCP, BraTS training, validation, its held-out label
    assert all(k in a and _same_content(a[k], b[k]) for k in common)

    # A different seed gives different subjects.
    third = tmp_path / "seed4"
    generate_default(third, workers=1, kinds=("hcp",), **{**SMALL, "seed": 4, "n_hcp": 1})
    (t1_new,) = third.glob("hcp/*/T1w/T1w_acpc_dc_restore_brain.nii.gz")
    t1_old = sorted(generated.glob("hcp/*/T1w/T1w_acpc_dc_restore_brain.nii.gz"))[0]
    assert not np.array_equal(_array(t1_new), _array(t1_old))
    assert hcp_subject_ids(3, 1) != hcp_subject_ids(4, 1)


def test_idempotent_second_call_touches_nothing(generated: Path) -> None:
    before = {k: p.stat().st_mtime_ns for k, p in _files(generated).items()}
    assert generate_default(generated, workers=1, **SMALL) == {"hcp": 0, "brats": 0}
    after = {k: p.stat().st_mtime_ns for k, p in _files(generated).items()}
    assert before == after


def test_deleted_subjects_are_regenerated(generated: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(generated, root)
    hcp_subject = sorted((root / "hcp").iterdir())[-1]
    shutil.rmtree(hcp_subject)
    (flair,) = (root / "brats" / BRATS_VALIDATION).glob("Brats18_SYNV_0002_1/*_flair.nii.gz")
    flair.unlink()
    (root / BRATS_VALIDATION_LABELS / "Brats18_SYNV_0001_1_seg.nii.gz").unlink()  # its images stay
    # A temporary folder left by a killed run is cleaned up.
    (root / "hcp" / ".tmp-999999-abc").mkdir()

    assert generate_default(root, workers=1, **SMALL) == {"hcp": 1, "brats": 2}
    a, b = _files(generated), _files(root)
    assert a.keys() == b.keys()
    assert all(_same_content(a[k], b[k]) for k in a if k.endswith(".nii.gz"))
    assert not (root / "hcp" / ".tmp-999999-abc").exists()


def test_interrupted_run_resumes(generated: Path, tmp_path: Path) -> None:
    root = tmp_path / "killed"
    shutil.copytree(generated / "hcp", root / "hcp")
    # A killed run: pending marker with the settings, no manifest, one subject missing.
    settings = json.loads((root / "hcp" / MANIFEST_NAME).read_text())
    (root / "hcp" / MANIFEST_NAME).unlink()
    (root / "hcp" / PENDING_NAME).write_text(json.dumps(settings))
    shutil.rmtree(sorted(p for p in (root / "hcp").iterdir() if p.is_dir() and not p.name.startswith("."))[0])
    assert generate_default(root, workers=1, kinds=("hcp",), **SMALL) == {"hcp": 1}
    assert (root / "hcp" / MANIFEST_NAME).is_file() and not (root / "hcp" / PENDING_NAME).exists()

    # Killed after the last subject but before the manifest: nothing to write, manifest completed.
    (root / "hcp" / MANIFEST_NAME).unlink()
    (root / "hcp" / PENDING_NAME).write_text(json.dumps(settings))
    assert generate_default(root, workers=1, kinds=("hcp",), **SMALL) == {"hcp": 0}
    assert (root / "hcp" / MANIFEST_NAME).is_file() and not (root / "hcp" / PENDING_NAME).exists()


@pytest.mark.parametrize(
    ("change", "word"),
    [({"seed": 5}, "seed"), ({"size": 16}, "size"), ({"n_hcp": 4}, "counts"), ({"n_brats_val": 3}, "counts")],
)
def test_changed_settings_are_refused(generated: Path, change: dict[str, int], word: str) -> None:
    before = {k: p.stat().st_mtime_ns for k, p in _files(generated).items()}
    with pytest.raises(DataError, match=word) as info:
        generate_default(generated, workers=1, **{**SMALL, **change})
    assert "delete" in str(info.value)
    assert {k: p.stat().st_mtime_ns for k, p in _files(generated).items()} == before


def test_foreign_folder_and_bad_arguments_are_refused(tmp_path: Path) -> None:
    (tmp_path / "hcp" / "100307").mkdir(parents=True)
    with pytest.raises(DataError, match="not generated"):
        generate_default(tmp_path, kinds=("hcp",), **SMALL)
    with pytest.raises(DataError, match="kinds"):
        generate_default(tmp_path / "x", kinds=("mnist",), **SMALL)
    with pytest.raises(DataError, match="size"):
        generate_default(tmp_path / "x", **{**SMALL, "size": 4})
    with pytest.raises(DataError, match="n_brats"):
        generate_default(tmp_path / "x", **{**SMALL, "n_brats": -1})
    assert not (tmp_path / "x").exists()


def test_missing_deepmriprep_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import tmerge.data.synthetic.anatomy as anatomy

    monkeypatch.setattr(anatomy.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps deepmriprep==0\.3\.0"):
        anatomy.template_dir()


def test_structures_target_is_deterministic_and_nnunet(tmp_path: Path) -> None:
    """The positive control: the same arrays in one process and in two, an nnU-Net v2 raw
    dataset that reads as a non-BraTS target, labels 0/1/2 inside the brain."""
    import json

    from tmerge.data.formats import open_target

    one, two = tmp_path / "one", tmp_path / "two"
    assert generate_default(one, kinds=("structures",), size=16, workers=1, progress=False) == {"structures": 70}
    generate_default(two, kinds=("structures",), size=16, workers=2, progress=False)
    a, b = _files(one / "structures"), _files(two / "structures")
    images = [k for k in a if k.endswith(".nii.gz")]
    assert len(images) == 60 * 4 + 10 * 3 and set(images) == {k for k in b if k.endswith(".nii.gz")}
    assert all(_same_content(a[k], b[k]) for k in images)
    spec = json.loads((one / "structures" / "dataset.json").read_text())
    assert spec["channel_names"] == {"0": "syn1", "1": "syn2", "2": "syn3"}
    layout = open_target(one / "structures")
    assert layout.task == "target" and layout.scheme.classes == ("thalamus", "caudate")
    label = _array(a["labelsTr/structures_001.nii.gz"])
    image = _array(a["imagesTr/structures_001_0000.nii.gz"])
    assert set(np.unique(label)) == {0, 1, 2} and not (label[image == 0] > 0).any()


def test_fit_to_grid_keeps_every_voxel_where_it_was_in_the_world() -> None:
    from tmerge.data.synthetic.write import fit_to_grid

    rng = np.random.default_rng(0)
    cube = rng.integers(1, 100, size=(10, 10, 10, 2)).astype(np.int16)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 0.5]
    out, shifted = fit_to_grid(cube, affine, (14, 10, 7))  # pad 2 + 2, keep, crop 1 below and 2 above
    assert out.shape == (14, 10, 7, 2) and out.dtype == cube.dtype
    assert np.array_equal(out[2:12, :, :], cube[:, :, 1:8])
    assert not out[:2].any() and not out[12:].any()  # the padding is background
    for voxel in ((0, 0, 1), (9, 9, 7), (4, 6, 3)):
        world = affine @ np.array([*voxel, 1.0])
        moved = np.linalg.solve(shifted, world)[:3]  # where that world point is in the output
        assert np.allclose(moved, np.round(moved))
        i, j, k = np.round(moved).astype(int)
        assert np.array_equal(out[i, j, k], cube[voxel])
    # Odd differences: the extra padded voxel goes before, the extra cropped one after.
    odd, _ = fit_to_grid(cube[..., 0], affine, (13, 9, 10))
    assert odd.shape == (13, 9, 10) and np.array_equal(odd[2:12, :, :], cube[:, :9, :, 0])


def test_a_grid_writes_every_file_in_that_shape(tmp_path: Path) -> None:
    """BraTS's 1 mm geometry (240 × 240 × 155 from the 192³ cube) scaled down: 32³ into
    40 × 40 × 26; the manifest records the grid, and another grid is refused."""
    settings = {**SMALL, "n_hcp": 1, "n_brats": 1, "n_brats_val": 1}
    generate_default(tmp_path, workers=1, grid=(40, 40, 26), **settings)
    files = [p for p in tmp_path.rglob("*.nii.gz")]
    assert len(files) == 3 + 5 + 4 + 1  # hcp, brats training, validation and its held-out labels
    for path in files:
        assert nib.load(str(path)).shape == (40, 40, 26), path
    t1 = next(p for p in files if p.name.startswith("T1w"))
    assert _array(t1).any()  # the brain is in the box
    manifest = json.loads((tmp_path / "hcp" / MANIFEST_NAME).read_text())
    assert manifest["grid"] == [40, 40, 26] and manifest["size"] == 32
    with pytest.raises(DataError, match="grid"):
        generate_default(tmp_path, workers=1, grid=(40, 40, 24), **settings)
    with pytest.raises(DataError, match="grid=.*three voxel counts"):
        generate_default(tmp_path / "other", workers=1, grid=(40, 40), **settings)


def test_tmerge_data_takes_the_grid_and_the_counts(tmp_path: Path) -> None:
    from tmerge.cli import main

    args = ["data", f"data_dir={tmp_path}", "size=32", "grid=[40,40,26]", "kinds=[hcp,brats]"]
    assert main([*args, "n_hcp=2", "n_brats=1", "n_brats_val=0", "workers=1"]) == 0
    assert len(list((tmp_path / "default" / "hcp").glob("1*"))) == 2
    [seg] = (tmp_path / "default" / "brats").rglob("*_seg.nii.gz")
    assert nib.load(str(seg)).shape == (40, 40, 26)
    assert main([*args[:3], "grid=[40,40]"]) == 2  # a clear error, not a traceback
