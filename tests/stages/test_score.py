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


def missed_satellite(tmp_path):
    """One subject whose prediction misses a satellite of oedema (label 2, WT only), at 1 × 1 × 3
    mm: the truth is a 4×4×3 block plus a 2×2×1 satellite 5 voxels beyond it and one slice up;
    the prediction is the block alone. ET and TC are empty in both maps."""
    affine = np.diag([1.0, 1.0, 3.0, 1.0])
    truth = np.zeros((14, 6, 4), dtype=np.uint8)
    truth[0:4, 1:5, 0:3] = 2  # 48 voxels, 44 of them on the border
    truth[9:11, 2:4, 3] = 2  # the satellite: 4 border voxels
    pred = truth.copy()
    pred[9:11, 2:4, 3] = 0
    preds, labels = tmp_path / "pred", tmp_path / "labels"
    save_labels(preds / "Brats18_S_1.nii.gz", pred, affine)
    save_labels(labels / "Brats18_S_1_seg.nii.gz", truth, affine)
    return preds, labels


def test_score_gives_the_pooled_hd95_of_a_one_sided_error(tmp_path):
    """What the leaderboard (medpy's hd95: pooled) and MONAI (directed) make of a missed satellite.

    The prediction's 44 border voxels lie on the truth's border (distance 0). Of the truth's 48
    border voxels, the block's 44 are at 0 and the satellite's at √(6² + 3²) = √45 (x = 9, two
    voxels) and √(7² + 3²) = √58 mm (x = 10, two) from the block's top corner row (3, y, 2).
    Pooled: the 95th percentile of all 92 distances, position 0.95 · 91 = 86.45, is among the 88
    zeros: HD95 0 mm. Directed: the 95th percentile of the truth's 48 alone, position 0.95 · 47 =
    44.65, lies between the 45th and 46th smallest, both √45: 6.708 mm. Dice WT = 2·48/(48 + 52).
    """
    preds, labels = missed_satellite(tmp_path)
    out = {}
    for hd95 in ("pooled", "directed"):
        args = [f"predictions={preds}", f"labels={labels}", f"out={tmp_path / hd95}", f"metrics.hd95={hd95}"]
        assert main(["score", *args]) == 0
        (row,) = csv.DictReader((tmp_path / hd95 / "scores.csv").open())
        out[hd95] = float(row["hd95_WT"])
        assert float(row["dice_WT"]) == pytest.approx(0.96)
    assert out["pooled"] == pytest.approx(0.0, abs=1e-6)  # the leaderboard's HD95
    assert out["directed"] == pytest.approx(np.sqrt(45), rel=1e-6)  # 6.708 mm, MONAI's
    assert main(["score", f"predictions={preds}", f"labels={labels}", f"out={tmp_path / 'default'}"]) == 0
    default = (tmp_path / "default" / "scores.csv").read_text()
    assert default == (tmp_path / "pooled" / "scores.csv").read_text()  # pooled is the default
    # brats2018 (the default): ET and TC empty in both score Dice 1, HD95 0; no n_empty key.
    summary = json.loads((tmp_path / "default" / "scores_summary.json").read_text())
    assert set(summary) == {"n", "dice", "hd95"}
    assert summary["dice"]["ET"] == 1.0 and summary["hd95"]["TC"] == 0.0


def test_score_brats2023_rules_drop_and_count_regions_empty_in_both(tmp_path):
    preds, labels = missed_satellite(tmp_path)
    args = [f"predictions={preds}", f"labels={labels}", "metrics.convention=brats2023"]
    assert main(["score", *args]) == 0
    (row,) = csv.DictReader((preds / "scores.csv").open())
    assert row["dice_ET"] == "nan" and row["hd95_TC"] == "nan"
    assert float(row["dice_mean"]) == pytest.approx(0.96)  # the mean over the scored region, WT
    summary = json.loads((preds / "scores_summary.json").read_text())
    assert summary["n_empty"] == {"ET": 1, "TC": 1, "WT": 0}
    assert summary["dice"]["ET"] is None and summary["dice"]["mean"] == pytest.approx(0.96)
    assert summary["hd95"]["WT"] == pytest.approx(0.0, abs=1e-6)


def test_score_refuses_unknown_metrics_settings(tmp_path, capsys):
    preds, labels = missed_satellite(tmp_path)
    assert main(["score", f"predictions={preds}", f"labels={labels}", "metrics.hd95=mean"]) == 2
    assert "metrics.hd95: expected one of pooled, directed, got 'mean'" in capsys.readouterr().err
    assert main(["score", f"predictions={preds}", f"labels={labels}", "metrics.convention=2023"]) == 2
    assert "metrics.convention: expected one of brats2018, brats2023, got '2023'" in capsys.readouterr().err
