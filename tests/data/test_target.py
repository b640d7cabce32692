"""Targets that are datasets: the label schemes, the generic nnU-Net reading, channel matching and
splits for any dataset size."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from tmerge.data.channels import canonical_channel, match_channels
from tmerge.data.formats import open_target
from tmerge.data.labels import brats_regions, regions_to_brats
from tmerge.data.schemes import BRATS_SCHEME, LabelScheme
from tmerge.data.splits import brats_splits
from tmerge.errors import ConfigError, DataError


def test_brats_scheme_is_the_brats_regions_exactly():
    """The generic region painting, given BraTS' regions, is regions_to_brats / brats_regions."""
    rng = np.random.default_rng(0)
    seg = rng.choice([0, 1, 2, 4], size=(9, 8, 7))
    assert np.array_equal(BRATS_SCHEME.masks(seg), brats_regions(seg))
    assert np.array_equal(BRATS_SCHEME.to_target(seg), brats_regions(seg).astype(np.uint8))
    for _ in range(20):
        regions = rng.random((3, 5, 5, 5)) > 0.5  # not nested: the innermost must win
        assert np.array_equal(BRATS_SCHEME.label_map(regions), regions_to_brats(regions))
    assert BRATS_SCHEME.n_outputs == 3 and BRATS_SCHEME.label_names()[4] == "enhancing"


def test_plain_scheme_masks_and_label_map():
    scheme = LabelScheme.plain(["thalamus", "caudate"])
    labels = np.array([[0, 1], [2, 1]])
    assert scheme.masks(labels).tolist() == [[[False, True], [False, True]], [[False, False], [True, False]]]
    assert scheme.n_outputs == 3 and scheme.to_target(labels).shape == (1, 2, 2)
    onehot = np.eye(3)[labels].transpose(2, 0, 1)  # (C, 2, 2)
    assert np.array_equal(scheme.label_map(onehot), labels)
    assert scheme.label_names() == {0: "background", 1: "thalamus", 2: "caudate"}


def test_region_scheme_paints_the_largest_region_first():
    """nnU-Net regions organ = {1, 2} ⊃ lesion = {2}, regions_class_order [1, 2]: where both are
    predicted the lesion (inner) wins, whatever the listed order."""
    scheme = LabelScheme("sigmoid", ("lesion", "organ"), ((2,), (1, 2)), paint=(2, 1))
    hard = np.array([[1, 0, 0], [1, 1, 0]], dtype=bool)[:, :, None]  # (2 regions, 3, 1)
    assert scheme.label_map(hard)[:, 0].tolist() == [2, 1, 0]
    truth = np.array([2, 1, 0])
    assert scheme.masks(truth).tolist() == [[True, False, False], [True, True, False]]


def test_channel_names_compare_as_contrasts():
    assert canonical_channel("T1w") == canonical_channel("t1n") == "t1"
    assert canonical_channel("T2-FLAIR") == "flair" and canonical_channel("CT") == "ct"
    assert match_channels(["T2w", "T1"], ["T1", "T2"]) == [1, 0]
    assert match_channels(["t1", "t1ce", "t2", "flair"], ["T1", "T2"]) is None  # BraTS: re-initialised
    assert match_channels(["syn1", "syn2", "syn3"], ["T1", "T2"]) is None


def _nnunet(root, labels, channels=("CT", "PET", "DWI"), order=None, cases=4, values=(0, 1, 2)):
    root.mkdir(parents=True)
    spec = {"channel_names": {str(i): c for i, c in enumerate(channels)}, "labels": labels, "file_ending": ".nii.gz"}
    if order is not None:
        spec["regions_class_order"] = order
    (root / "dataset.json").write_text(json.dumps(spec))
    (root / "imagesTr").mkdir()
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(1)
    for k in range(cases):
        for c in range(len(channels)):
            nib.save(nib.Nifti1Image(rng.random((8, 8, 8)).astype(np.float32), np.eye(4)), root / "imagesTr" / f"c{k}_{c:04d}.nii.gz")
        label = rng.choice(values, size=(8, 8, 8)).astype(np.uint8)
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / "labelsTr" / f"c{k}.nii.gz")
    return root


def test_generic_nnunet_target_reads_its_own_channels_and_labels(tmp_path):
    root = _nnunet(tmp_path / "ds", {"background": 0, "liver": 2, "spleen": 5}, values=(0, 2, 5))
    layout = open_target(root)
    assert layout.task == "target" and layout.input_channels == ("CT", "PET", "DWI")
    assert layout.scheme == LabelScheme.plain(["liver", "spleen"])
    # values 2 and 5 are classes 1 and 2 internally, written back as 2 and 5
    assert layout.labels.to_internal(np.array([0, 2, 5]), "x").tolist() == [0, 1, 2]
    assert layout.labels.to_dataset(np.array([0, 1, 2])).tolist() == [0, 2, 5]
    with pytest.raises(DataError, match=r"x: label values \{3\} are not nnU-Net .* expected only 0, 2, 5"):
        layout.labels.to_internal(np.array([0, 3]), "x")
    assert len(layout.discover().labelled) == 4


def test_output_mode_must_fit_the_dataset(tmp_path):
    regions = _nnunet(tmp_path / "r", {"background": 0, "organ": [1, 2], "lesion": 2}, order=[1, 2])
    with pytest.raises(ConfigError, match="data.output_mode=softmax: .* declares regions"):
        open_target(regions, output_mode="softmax")
    assert open_target(regions).scheme.mode == "sigmoid"
    plain = _nnunet(tmp_path / "p", {"background": 0, "a": 1, "b": 2})
    with pytest.raises(ConfigError, match="data.output_mode=sigmoid: .* plain labels"):
        open_target(plain, output_mode="sigmoid")
    with pytest.raises(ConfigError, match="data.layout: expected null or one of"):
        open_target(plain, layout="hcp")


def test_brats_channels_and_tumour_labels_stay_brats(tmp_path):
    root = _nnunet(
        tmp_path / "b",
        {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3},
        channels=("FLAIR", "T1w", "t1gd", "T2w"),
        values=(0, 1, 2, 3),
    )
    layout = open_target(root)
    assert layout.task == "brats" and layout.scheme == BRATS_SCHEME
    # the same plain labels as classes, when asked for
    forced = open_target(root, output_mode="softmax")
    assert forced.task == "target" and forced.scheme.classes == ("edema", "non-enhancing tumor", "enhancing tumour")


def test_splits_of_a_small_dataset_say_what_is_possible():
    ids = [f"c{i:02d}" for i in range(30)]
    with pytest.raises(DataError, match=r"found 30 labelled cases; data.test_size=40 leaves 0 .* e.g. data.test_size=6 data.pool_size=null"):
        brats_splits(ids, 8)
    splits = brats_splits(ids, 100, test_size=6, pool_size=None)
    assert len(splits["test"]) == 6 and len(splits["train"]) == 24 and splits["val"] == splits["test"]
    small = brats_splits(ids, 50, test_size=6, pool_size=None)
    assert (len(small["train"]), len(small["val"])) == (10, 2)  # round(0.5 · 24) = 12, 80/20
    with pytest.raises(DataError, match=r"gives 1 subjects; need at least 2 .* portion >= 7 with this pool"):
        brats_splits(ids, 5, test_size=6, pool_size=None)


def test_a_recorded_target_stands_in_for_its_missing_root(tmp_path):
    """A run's target.json lets its network predict where the dataset root is not: the same
    channels, scheme and label mapping (values written back as the dataset's)."""
    from tmerge.data.target import TargetDataModule

    root = _nnunet(tmp_path / "ds", {"background": 0, "liver": 2, "spleen": 5}, values=(0, 2, 5))
    here = TargetDataModule(root=str(root))
    recorded = json.loads(json.dumps(here.recorded()))  # through JSON, as the run folder holds it
    assert LabelScheme.from_meta(recorded["scheme"]) == here.scheme
    away = TargetDataModule(root=str(tmp_path / "elsewhere"), described=recorded)
    assert (away.kind, away.modalities, away.scheme, away.name) == ("target", ("CT", "PET", "DWI"), here.scheme, "ds")
    assert away.preprocess_settings().labels == here.preprocess_settings().labels
    assert away.n_outputs == 3 and away.output_mode == "softmax"
    region = LabelScheme("sigmoid", ("organ", "lesion"), ((1, 2), (2,)), paint=(1, 2), names=((1, "a"), (2, "b")))
    assert LabelScheme.from_meta(json.loads(json.dumps(region.as_meta()))) == region
