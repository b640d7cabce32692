"""Fig. 3's slices: the forgetting stage's ``examples.npz`` read back by the report, and the
tumour slice taken from BraTS predictions and the dataset."""

from __future__ import annotations

import json

import numpy as np

from tmerge.report.examples import median_subject, parcellation_rows, tumour_rows
from tmerge.report.figures import plot_examples
from tmerge.report.runs import SINGLE, discover
from tmerge.report.tables import Row


def test_forgetting_examples_round_trip(fake):
    from tmerge.stages.forgetting import busiest_slice

    from .conftest import parcellation_examples

    path = fake.forgetting(4) / "examples.npz"
    volumes = parcellation_examples()
    k = busiest_slice(volumes["task1"]["truth"])
    assert k >= 4  # the fake ground truth is empty below z = 4
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        assert meta["subject"] == "HCP_0001" and meta["slice"] == k
        assert meta["rows"] == ["M1", "M2", "IMM", "T-IMM"]
        assert [t["name"] for t in meta["tasks"]] == ["task1", "task2"]
        assert data["task1/M2"].dtype == np.uint8 and data["task1/image"].dtype == np.float32
        np.testing.assert_array_equal(data["task2/IMM"], volumes["task2"]["pred"]["IMM"][..., k])
    rows, notes = parcellation_rows(discover(fake.root).forgetting)
    assert notes == []
    assert [len(r.panels) for r in rows] == [5, 5]  # four candidates and the ground truth
    assert rows[0].panels[-1][0] == "ground truth" and rows[0].class_names[0] == "class 1"


def test_forgetting_folder_without_examples_is_a_note(fake):
    fake.forgetting(4, examples=False)
    rows, notes = parcellation_rows(discover(fake.root).forgetting)
    assert rows == [] and "no examples.npz" in notes[0]


def test_tumour_row_uses_predictions_image_and_ground_truth(fake, tmp_path):
    fake.brats_data()
    fake.target(4, "none", predictions=True)
    fake.target(4, "timm", offset=0.03, predictions=True)
    fake.target(4, "m1")  # an old run without predictions/
    index = discover(fake.root)
    rows, notes = tumour_rows(index, [Row(4, SINGLE)], ["none", "m1", "timm"], "timm")
    assert len(rows) == 1 and notes == ["4 %: no predictions/ in m1"]
    row = rows[0]
    assert [name for name, _ in row.panels] == ["none", "timm", "ground truth"]
    assert row.image.shape == row.panels[0][1].shape == (24, 24)
    assert set(np.unique(row.panels[-1][1])) == {0, 1, 2, 4}  # the slice through the tumour
    # the subject shown is the one with T-IMM's median Dice, named in the row title
    timm = index.find(4, "timm", None)
    assert median_subject(timm.subject_values("dice_mean")) in row.title
    plot_examples([("parcellation", [], ["none here"]), ("tumours", rows, notes)], tmp_path / "fig3.png")
    assert (tmp_path / "fig3.png").stat().st_size > 1000


def test_tumour_row_without_dataset_says_so(fake):
    fake.target(4, "timm", predictions=True)  # fake.brats_data() not written
    rows, notes = tumour_rows(discover(fake.root), [Row(4, SINGLE)], ["timm"], "timm")
    assert rows == [] and "not found under" in notes[0]


def test_median_subject():
    assert median_subject({"a": 0.1, "b": 0.9, "c": 0.5}) == "c"
    assert median_subject({"a": 0.1, "b": 0.9, "c": 0.5, "d": 0.6}) == "c"
