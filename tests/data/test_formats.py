"""The dataset-format registry: detection, the same cases and arrays in every layout, label
mappings and their inverses, geometry (resampling and back), and malformed input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import layouts, trees

from tmerge.data import HCPDataModule, TargetDataModule
from tmerge.data.formats import FORMATS, detect, expected_layouts
from tmerge.data.geometry import uncrop, voxel_spacing
from tmerge.data.labels import BRATS2023_LABELS, LabelMapping, dataset_labels, regions_to_brats
from tmerge.data.nnunet import read_dataset_json
from tmerge.data.preprocess import PreprocessSettings, original_labels
from tmerge.errors import ConfigError, DataError
from tmerge.evaluate import evaluate_subject, save_prediction

LAYOUTS = ("brats2018", "brats2021", "brats2023", "nnunet")


@pytest.fixture(scope="module")
def brats(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, str]]]:
    """One small BraTS set in every layout: name → (root, {id: BraTS 2018 id})."""
    base = tmp_path_factory.mktemp("layouts")
    src = base / "brats2018"
    train, val = trees.write_brats_tree(src, n_train=12, n_val=2)
    out = {"brats2018": (src, {s: s for s in train + val})}
    for name, convert in (
        ("brats2021", layouts.to_brats2021),
        ("brats2023", layouts.to_brats2023),
        ("nnunet", layouts.to_nnunet),
    ):
        out[name] = (base / name, convert(src, base / name))
    layouts.anisotropic(base / "brats2021", base / "anisotropic")
    out["anisotropic"] = (base / "anisotropic", out["brats2021"][1])
    return out


def _dm(root: Path, cache: Path, **kw: object) -> TargetDataModule:
    fields = {"test_size": 4, "pool_size": 10, "portion": 80, "n4": False, "patch_size": 16, **kw}
    return TargetDataModule(root=str(root), cache_dir=str(cache), divisor=16, **fields)  # the default net's


def test_each_layout_is_detected(brats, tmp_path: Path) -> None:
    for name in LAYOUTS:
        assert detect(brats[name][0], "brats").format.name == name
    hcp = tmp_path / "hcp"
    trees.write_hcp_tree(hcp, n=3)
    layouts.hcp_to_nnunet(hcp, tmp_path / "hcp_nnunet")
    assert detect(hcp, "hcp").format.name == "hcp"
    assert detect(tmp_path / "hcp_nnunet", "hcp").format.name == "nnunet"
    # Case folders one level below the root (a release's TrainingData/ and ValidationData/).
    nested = tmp_path / "nested"
    shutil.copytree(brats["brats2023"][0], nested / "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData")
    assert detect(nested, "brats").format.name == "brats2023"
    kaggle = tmp_path / "kaggle"
    shutil.copytree(brats["brats2021"][0], kaggle / "BraTS2021_Training_Data")
    layout = detect(kaggle, "brats")
    assert (
        layout.format.name == "brats2021"
        and list(layout.discover().labelled) == sorted(brats["brats2021"][1])[:12]
    )


def test_a_root_of_no_format_is_one_error_listing_the_layouts(tmp_path: Path) -> None:
    (tmp_path / "stray").mkdir()
    with pytest.raises(DataError) as info:
        detect(tmp_path, "brats")
    message = str(info.value)
    assert message.startswith(f"{tmp_path}: no BraTS dataset layout found; expected ")
    for name in LAYOUTS:
        assert FORMATS[name].hint in message and FORMATS[name].title in message
    assert (
        "\n" not in message
        and message == f"{tmp_path}: no BraTS dataset layout found; expected {expected_layouts('brats')}"
    )
    with pytest.raises(DataError, match="HCP.*nnU-Net v2 raw"):
        HCPDataModule(root=str(tmp_path)).check_layout()


def test_every_layout_lists_the_same_cases_and_draws_the_same_splits(brats, tmp_path: Path) -> None:
    reference = _dm(brats["brats2018"][0], tmp_path / "c")
    reference.check_layout()
    for name in LAYOUTS[1:]:
        root, ids = brats[name]
        dm = _dm(root, tmp_path / "c")
        dm.check_layout()
        for part in ("train", "val", "test"):
            assert [ids[s] for s in dm.subjects[part]] == reference.subjects[part], (name, part)
        full = _dm(root, tmp_path / "c", portion=100)
        full.check_layout()
        assert [ids[s] for s in full.subjects["predict"]] == ["Brats18_CBICA_V00_1", "Brats18_CBICA_V01_1"]


def test_every_layout_preprocesses_to_the_same_arrays(brats, tmp_path: Path) -> None:
    """Images byte for byte, labels in each layout's values: the same internal arrays."""
    reference = _dm(brats["brats2018"][0], tmp_path / "c")
    reference.setup("validate")
    [ref] = reference.loaded_subjects("val")[:1]
    for name in LAYOUTS[1:]:
        root, ids = brats[name]
        dm = _dm(root, tmp_path / "c")
        dm.setup("validate")
        subject = dm.loaded_subjects("val")[0]
        assert ids[subject.id] == ref.id
        assert np.array_equal(subject.image, ref.image) and np.array_equal(subject.target, ref.target), name
        assert subject.meta["crop_start"] == ref.meta["crop_start"]
        assert subject.meta["modalities"] == ["t1", "t1ce", "t2", "flair"]


def test_nnunet_channels_come_in_the_task_order(brats) -> None:
    root, _ = brats["nnunet"]
    layout = detect(root, "brats")
    case = next(iter(layout.discover().labelled.values()))
    files, label = case.files(labelled=True)
    assert {m: f.name[-11:] for m, f in files.items()} == {
        "t1": "0001.nii.gz",
        "t1ce": "0002.nii.gz",
        "t2": "0003.nii.gz",
        "flair": "0000.nii.gz",
    }
    assert label is not None and label.parent.name == "labelsTr"


def test_brats2018_is_unchanged(brats, tmp_path: Path) -> None:
    """The default layout's cache keys, settings, split record and meta are those of before the
    registry (the measured numbers depend on them)."""
    # Padded to the default network's divisor, 16.
    assert PreprocessSettings(multiple=16).digest() == "56598298cbc81089"
    assert (
        PreprocessSettings(n4=True, multiple=16, min_size=48).digest(kind="brats", source="/data/brats")
        == "502c47207962909b"
    )
    assert PreprocessSettings(multiple=16, min_size=16).digest(kind="hcp", source="/x") == "fe1c0005a1ee1397"
    dm = _dm(brats["brats2018"][0], tmp_path / "c", run_dir=str(tmp_path / "run"))
    assert dm.preprocess_settings() == PreprocessSettings(n4=False, multiple=16, min_size=16)
    dm.setup("validate")
    record = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert list(record)[:3] == ["kind", "root", "train"] and "format" not in record
    meta = dm.loaded_subjects("val")[0].meta
    assert set(meta) == {
        "subject", "kind", "modalities", "original_shape", "affine",
        "crop_start", "crop_end", "pad_before", "pad_after", "shape",
    }  # fmt: skip


def test_label_mappings_round_trip() -> None:
    rng = np.random.default_rng(0)
    internal = rng.choice([0, 1, 2, 4], size=(5, 6, 7)).astype(np.uint8)
    # BraTS 2023: 3 is enhancing.
    as_2023 = BRATS2023_LABELS.to_dataset(internal)
    assert set(np.unique(as_2023)) == {0, 1, 2, 3}
    assert np.array_equal(BRATS2023_LABELS.to_internal(as_2023, "x"), internal)
    # nnU-Net region labels (nnU-Net's BraTS conversion) and plain Decathlon labels alike.
    for labels, order in ((layouts.NNUNET_REGIONS, [1, 2, 3]), (None, None)):
        extra = {} if order is None else {"regions_class_order": order}
        if labels is None:
            labels = {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}
        spec = _spec(labels=labels, **extra)
        values = spec.labels.to_dataset(internal)
        expected = np.select([internal == 2, internal == 1, internal == 4], [1, 2, 3], 0)
        assert np.array_equal(values, expected)
        assert np.array_equal(spec.labels.to_internal(values, "x"), internal)
    # A mapping travels in meta as JSON and writes predictions in the dataset's values.
    meta = json.loads(json.dumps({"labels": BRATS2023_LABELS.as_meta()}))
    assert LabelMapping.from_meta(meta["labels"]) == BRATS2023_LABELS
    assert np.array_equal(dataset_labels(internal, meta), as_2023)
    assert np.array_equal(dataset_labels(internal, {"affine": []}), internal)
    with pytest.raises(
        DataError,
        match=r"seg\.nii\.gz: label values \{4\} are not BraTS 2023 labels; expected only 0, 1, 2, 3",
    ):
        BRATS2023_LABELS.to_internal(internal, "seg.nii.gz")


def _spec(tmp: Path | None = None, task: str = "brats", **data: object):
    import tempfile

    root = Path(tmp or tempfile.mkdtemp())
    content = {
        "channel_names": layouts.NNUNET_CHANNEL_NAMES if task == "brats" else {"0": "T1", "1": "T2"},
        "labels": layouts.NNUNET_REGIONS,
        "file_ending": ".nii.gz",
        "regions_class_order": [1, 2, 3],
        **data,
    }
    (root / "dataset.json").write_text(json.dumps({k: v for k, v in content.items() if v is not None}))
    return read_dataset_json(root, task)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": None}, r"missing key 'labels'; expected an nnU-Net v2 dataset\.json"),
        ({"channel_names": None, "modality": {"0": "T1"}}, r"missing key 'channel_names'.*v1's 'modality'"),
        ({"file_ending": ".mha"}, r"'file_ending': got '\.mha'; expected one of \.nii\.gz, \.nii"),
        (
            {"channel_names": {"0": "FLAIR", "1": "T1w", "2": "T2w"}},
            r"'channel_names' .* channel 't1ce' 0 times",
        ),
        (
            {"channel_names": {"0": "T1", "2": "T2"}},
            r"'channel_names': got .*expected a mapping of channel indices 0\.\.C-1",
        ),
        (
            {"regions_class_order": None},
            r"'regions_class_order': got None; expected one label value per region",
        ),
        ({"regions_class_order": [3, 2, 1]}, r"'regions_class_order'.*one of its own label values"),
        (
            {"labels": {"background": 0, "a": [1, 2], "b": [2, 3], "c": 3}},
            r"'labels' regions .*expected three nested",
        ),
        (
            {"labels": {"background": 0, "tumour": 1, "other": 2}},
            r"'labels' .*cannot tell the tumour regions \(unknown names",
        ),
        ({"labels": {"edema": 1}}, r"'labels': got .*expected exactly one entry of value 0"),
        ({"labels": {"background": 0, "x": "one"}}, r"'labels' entry 'x': got 'one'; expected a label value"),
    ],
)
def test_bad_dataset_json_names_the_key(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(DataError, match=message) as info:
        _spec(tmp_path, **change)
    assert str(info.value).startswith(str(tmp_path / "dataset.json"))


def test_bad_nnunet_files_name_the_file(brats, tmp_path: Path) -> None:
    root = Path(shutil.copytree(brats["nnunet"][0], tmp_path / "nnunet"))
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset\.json: not valid JSON"):
        _dm(root, tmp_path / "c").check_layout()
    shutil.copyfile(brats["nnunet"][0] / "dataset.json", root / "dataset.json")
    (root / "labelsTr" / "BRATS_003.nii.gz").unlink()
    with pytest.raises(DataError, match=r"labelsTr/BRATS_003\.nii\.gz: file not found; expected a label map"):
        _dm(root, tmp_path / "c").check_layout()
    shutil.copyfile(
        brats["nnunet"][0] / "labelsTr" / "BRATS_003.nii.gz", root / "labelsTr" / "BRATS_003.nii.gz"
    )
    (root / "imagesTr" / "BRATS_004_0002.nii.gz").unlink()
    with pytest.raises(
        DataError, match=r"imagesTr/BRATS_004_0002\.nii\.gz: file not found; expected every case"
    ):
        _dm(root, tmp_path / "c").check_layout()
    (tmp_path / "source").mkdir()
    with pytest.raises(DataError, match="holds regions .*a parcellation source expects one value per class"):
        _spec(tmp_path / "source", task="hcp")


def test_predictions_are_written_in_the_layouts_convention(brats, tmp_path: Path) -> None:
    internal = np.zeros((22, 20, 18), np.uint8)
    internal[5:8, 5:8, 5:8], internal[9, 9, 9], internal[10, 10, 10] = 4, 1, 2
    expected = {"brats2021": {0, 1, 2, 4}, "brats2023": {0, 1, 2, 3}, "nnunet": {0, 1, 2, 3}}
    for name, values in expected.items():
        dm = _dm(brats[name][0], tmp_path / "c")
        dm.setup("validate")
        subject = dm.loaded_subjects("val")[0]
        out = save_prediction(tmp_path / name, subject.id, internal, subject.meta)
        written = np.asarray(nib.load(out).dataobj)
        assert set(np.unique(written)) == values, name
        if name == "nnunet":  # 1 edema, 2 NCR, 3 ET (regions_class_order)
            assert written[10, 10, 10] == 1 and written[9, 9, 9] == 2 and written[6, 6, 6] == 3


def test_resampled_cases_go_back_to_their_own_grid(brats, tmp_path: Path) -> None:
    root, _ = brats["anisotropic"]
    dm = _dm(root, tmp_path / "c", spacing=[3, 3, 3], orientation="RAS")
    settings = dm.preprocess_settings()
    assert settings.spacing == (3.0, 3.0, 3.0) and settings.orientation == "RAS"
    assert settings.digest() != PreprocessSettings(min_size=16).digest()  # part of the cache key
    dm.setup("validate")
    subject = dm.loaded_subjects("val")[0]
    meta = subject.meta
    seg_file = root / subject.id / f"{subject.id}_seg.nii.gz"
    seg = nib.load(seg_file)
    assert meta["original_shape"] == [22, 20, 9] and np.allclose(meta["affine"], seg.affine)
    assert nib.aff2axcodes(np.asarray(meta["grid_affine"])) == ("R", "A", "S")
    assert voxel_spacing(np.asarray(meta["grid_affine"])) == pytest.approx((3, 3, 3))
    assert meta["grid_shape"] == [22, 20, 17]
    # Back on the files' grid: a label map exactly (upsampling, nearest), the truth read again.
    truth = regions_to_brats(subject.target > 0)
    assert np.array_equal(uncrop(truth, meta), np.asarray(seg.dataobj))
    assert np.array_equal(original_labels(truth, meta), np.asarray(seg.dataobj))
    assert uncrop(subject.image, meta).shape == (4, 22, 20, 9)
    # The module's evaluation: a perfect prediction in the original geometry, scored there.
    logits = torch.from_numpy(np.where(subject.target > 0, 10.0, -10.0).astype(np.float32))
    result = evaluate_subject(logits, subject.target, meta, "sigmoid", ["ET", "TC", "WT"])
    assert result.labels.shape == (22, 20, 9) and result.spacing == pytest.approx((3, 3, 6))
    assert all(result.scores[f"dice_{r}"] == 1.0 for r in ("ET", "TC", "WT"))
    out = save_prediction(tmp_path / "pred", subject.id, result.labels, meta)
    written = nib.load(out)
    assert written.shape == seg.shape and np.allclose(written.affine, seg.affine)


def test_geometry_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="spacing: got \\[1, 1\\]; expected null or three positive"):
        TargetDataModule(spacing=[1, 1])
    with pytest.raises(ConfigError, match="spacing"):
        TargetDataModule(spacing=[1, 0, 1])
    with pytest.raises(ConfigError, match="orientation: got 'RAA'; expected null or three axis codes"):
        TargetDataModule(orientation="RAA")
    assert TargetDataModule(orientation="lps").preprocess_settings().orientation == "LPS"


def test_nnunet_parcellation_source(tmp_path: Path) -> None:
    """An HCP tree in nnU-Net v2 raw: its dataset.json names the classes; labels select values."""
    hcp = tmp_path / "hcp"
    trees.write_hcp_tree(hcp, n=58)
    ids = layouts.hcp_to_nnunet(hcp, tmp_path / "nnunet")
    reference = HCPDataModule(root=str(hcp), cache_dir=str(tmp_path / "c"), patch_size=16, split="task2")
    dm = HCPDataModule(
        root=str(tmp_path / "nnunet"), cache_dir=str(tmp_path / "c"), patch_size=16, split="task2"
    )
    assert dm.class_names == reference.class_names and dm.n_outputs == reference.n_outputs == 8
    dm.setup("validate")
    reference.setup("validate")
    assert [ids[s] for s in dm.subjects["val"]] == reference.subjects["val"]
    a, b = dm.loaded_subjects("val")[0], reference.loaded_subjects("val")[0]
    assert np.array_equal(a.image, b.image) and np.array_equal(a.target, b.target)
    with pytest.raises(ConfigError, match="labels: got '1:20'; expected .*the dataset's classes"):
        HCPDataModule(root=str(tmp_path / "nnunet"), labels="1:20")
    assert HCPDataModule(root=str(tmp_path / "nnunet"), split="all").n_outputs == 15


def test_bad_brats2023_files_name_the_file(brats, tmp_path: Path) -> None:
    root = Path(shutil.copytree(brats["brats2023"][0], tmp_path / "brats2023"))
    case = "BraTS-GLI-00003-000"
    seg = root / case / f"{case}-seg.nii.gz"
    img = nib.load(seg)
    nib.save(nib.Nifti1Image(np.where(np.asarray(img.dataobj) == 3, 4, 0).astype(np.uint8), img.affine), seg)
    with pytest.raises(
        DataError, match=rf"{case}-seg\.nii\.gz: label values \{{4\}} are not BraTS 2023 labels"
    ):
        _dm(root, tmp_path / "c", portion=60).prepare_data()  # 60 % of 10: every case is used
    (root / case / f"{case}-t2w.nii.gz").unlink()
    with pytest.raises(
        DataError, match=rf"{case}-t2w\.nii\.gz: file not found \(expected {case}-t2w\.nii\.gz"
    ):
        _dm(root, tmp_path / "c", portion=60).prepare_data()
