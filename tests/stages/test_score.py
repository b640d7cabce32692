"""``tmerge score``: BraTS-style grading of a prediction folder, against hand-computed scores."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from tmerge.cli import main
from tmerge.data.nifti import save_labels

AFFINE = np.diag([2.0, 1.0, 1.0, 1.0])  # 2 mm along the first axis


def volume(*boxes: tuple[int, slice, slice, slice]) -> np.ndarray:
    out = np.zeros((10, 10, 10), dtype=np.uint8)
    for value, *where in boxes:
        out[tuple(where)] = value
    return out


def test_scores_by_hand_in_both_label_layouts(tmp_path, capsys):
    preds, labels = tmp_path / "pred", tmp_path / "labels"
    # A: truth is an oedema block (2) with an enhancing core (4); the prediction gets WT right,
    # misses half of ET (8 of 16 voxels) and has no 1 anywhere.
    truth_a = volume((2, slice(2, 8), slice(2, 8), slice(2, 8)), (4, slice(4, 6), slice(4, 6), slice(4, 8)))
    pred_a = volume((2, slice(2, 8), slice(2, 8), slice(2, 8)), (4, slice(4, 6), slice(4, 6), slice(4, 6)))
    # B: no tumour in the truth, none predicted: Dice 1, HD95 0 for every region.
    truth_b, pred_b = volume(), volume()
    save_labels(preds / "Brats18_A_1.nii.gz", pred_a, AFFINE)
    save_labels(preds / "Brats18_B_1.nii.gz", pred_b, AFFINE)
    save_labels(labels / "Brats18_A_1_seg.nii.gz", truth_a, AFFINE)  # flat layout
    save_labels(labels / "HGG" / "Brats18_B_1" / "Brats18_B_1_seg.nii.gz", truth_b, AFFINE)  # BraTS layout
    assert main(["score", f"predictions={preds}", f"labels={labels}", f"out={tmp_path / 'out'}"]) == 0
    rows = {r["subject"]: r for r in csv.DictReader((tmp_path / "out" / "scores.csv").open())}
    a, b = rows["Brats18_A_1"], rows["Brats18_B_1"]
    # ET: |P ∩ T| = 8, |P| = 8, |T| = 16 → 2·8/24; TC = ET here (no label 1); WT identical → 1.
    assert float(a["dice_ET"]) == pytest.approx(16 / 24) and float(a["dice_TC"]) == pytest.approx(16 / 24)
    assert float(a["dice_WT"]) == pytest.approx(1.0) and float(a["hd95_WT"]) == pytest.approx(0.0)
    # The missed ET voxels lie 1 and 2 voxels (along the 1 mm axis) from the prediction.
    assert 0 < float(a["hd95_ET"]) <= 2.0
    assert all(float(b[f"dice_{r}"]) == 1.0 and float(b[f"hd95_{r}"]) == 0.0 for r in ("ET", "TC", "WT"))
    summary = json.loads((tmp_path / "out" / "scores_summary.json").read_text())
    assert summary["n"] == 2 and summary["dice"]["WT"] == pytest.approx(1.0)
    assert summary["dice"]["mean"] == pytest.approx(((16 / 24 * 2 + 1) / 3 + 1) / 2)


def test_missing_labels_and_other_grids_are_one_clear_error(tmp_path, capsys):
    preds, labels = tmp_path / "pred", tmp_path / "labels"
    save_labels(preds / "Brats18_A_1.nii.gz", volume(), AFFINE)
    save_labels(preds / "Brats18_C_1.nii.gz", volume(), AFFINE)
    labels.mkdir()
    assert main(["score", f"predictions={preds}", f"labels={labels}"]) == 2
    err = capsys.readouterr().err
    assert "no label map for 2 of 2 predictions (Brats18_A_1, Brats18_C_1)" in err and err.count("\n") == 1
    save_labels(labels / "Brats18_A_1.nii.gz", volume(), np.eye(4))
    save_labels(labels / "Brats18_C_1.nii.gz", volume(), AFFINE)
    assert main(["score", f"predictions={preds}", f"labels={labels}"]) == 2
    assert "on another grid than its label map" in capsys.readouterr().err
    assert not (preds / "scores.csv").exists()


def test_brats2023_convention_scores_alike_and_the_2018_one_refuses_its_values(tmp_path, capsys):
    """The same maps with enhancing written as 3 (BraTS 2023, its `<case>/<case>-seg` naming)
    score exactly as with 4; read as BraTS 2018 values, the 3 is one clear error."""
    truth = volume((2, slice(2, 8), slice(2, 8), slice(2, 8)), (4, slice(4, 6), slice(4, 6), slice(4, 8)))
    pred = volume((2, slice(2, 8), slice(2, 8), slice(2, 8)), (4, slice(4, 6), slice(4, 6), slice(4, 6)))
    case = "BraTS-GLI-00000-000"
    for name, convention, enhancing in (("2018", "brats2018", 4), ("2023", "brats2023", 3)):
        root = tmp_path / name
        save_labels(root / "pred" / f"{case}.nii.gz", np.where(pred == 4, enhancing, pred).astype(np.uint8), AFFINE)
        seg = np.where(truth == 4, enhancing, truth).astype(np.uint8)
        save_labels(root / "labels" / case / f"{case}-seg.nii.gz", seg, AFFINE)
        args = [f"predictions={root / 'pred'}", f"labels={root / 'labels'}", f"convention={convention}"]
        assert main(["score", *args]) == 0
    read = [(tmp_path / n / "pred" / "scores.csv").read_text() for n in ("2018", "2023")]
    assert read[0] == read[1] and "0.666" in read[0]  # ET Dice 16/24, as by hand above
    assert main(["score", f"predictions={tmp_path / '2023' / 'pred'}", f"labels={tmp_path / '2023' / 'labels'}"]) == 2
    err = capsys.readouterr().err
    assert "label values {3} are not BraTS labels; expected only 0, 1, 2, 4" in err and "Traceback" not in err
    assert main(["score", "predictions=x", "labels=y", "convention=msd"]) == 2
