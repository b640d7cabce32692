"""A target that is not BraTS, end to end: the generated ``structures`` set (nnU-Net v2 raw, three
channels no source saw, two plain classes) through ``timm``, ``predict`` and the report."""

from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from helpers.anatomy import require_anatomy
from helpers.tiny_settings import TINY_ARGS

from tmerge.cli import main

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def structures(tmp_path_factory):
    """The ``structures`` target at 32³ (60 labelled cases, 10 in imagesTs)."""
    require_anatomy()
    from tmerge.data.synthetic.generate import generate_default

    root = tmp_path_factory.mktemp("structures_data")
    generate_default(root, kinds=("structures",), size=32, workers=2, progress=False)
    return root / "structures"


@pytest.fixture(scope="module")
def runs(tiny_sources):
    """task1 and task2, trained tiny once for this module (tests/conftest.py)."""
    return tiny_sources


def target_args(structures, runs, portion=100):
    return [
        f"data.root={structures}",
        f"runs_dir={runs}",
        f"portion={portion}",
        "data.test_size=10",
        "data.pool_size=null",
        "data.n4=false",
        "adaption.max_epochs=1",
        *TINY_ARGS,
    ]


def test_show_config_describes_the_target(structures, capsys):
    assert main(["timm", "--show-config", *target_args(structures, "/tmp/unused")]) == 0
    out = capsys.readouterr().out
    assert "#   channels: ['syn1', 'syn2', 'syn3']" in out
    assert "#   output_mode: softmax" in out
    assert "#   classes: softmax over 2 classes: thalamus, caudate" in out
    assert "#   label_values: [0, 1, 2]" in out


def test_region_dataset_forced_to_softmax_is_one_error(tmp_path, capsys):
    root = tmp_path / "regions"
    (root / "imagesTr").mkdir(parents=True)
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "CT"},
                "labels": {"background": 0, "organ": [1, 2], "lesion": 2},
                "regions_class_order": [1, 2],
                "file_ending": ".nii.gz",
            }
        )
    )
    assert main(["timm", f"data.root={root}", "data.output_mode=softmax", "--show-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.output_mode=softmax" in err[0] and "declares regions" in err[0]
    # auto: the dataset's regions, one sigmoid output each
    assert main(["timm", f"data.root={root}", "--show-config"]) == 0
    assert "classes: sigmoid regions: organ = {1, 2}; lesion = {2}" in capsys.readouterr().out


def test_wrong_length_channel_map_is_one_error(structures, runs, capsys):
    assert main(["timm", "channel_map=[0,1]", *target_args(structures, runs)]) == 2
    err = capsys.readouterr().err
    assert "channel_map: got [0, 1] (2 entries); expected one source channel per target channel, 3" in err
    assert not (runs / "targets").exists()


def test_timm_on_a_non_brats_target(structures, runs, tmp_path, caplog):
    caplog.set_level("INFO", logger="tmerge")
    assert main(["timm", *target_args(structures, runs)]) == 0
    assert "channels syn1, syn2, syn3 are not all among task1's (T1, T2): the input layer is re-initialised" in caplog.text
    run = runs / "targets" / "structures" / "p100" / "timm"
    summary = json.loads((run / "test_summary.json").read_text())
    assert summary["n"] == 10
    assert set(summary["dice"]) == {"thalamus", "caudate", "mean"} and set(summary["hd95"]) == {"thalamus", "caudate"}
    with open(run / "test_per_subject.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "subject", "dice_thalamus", "dice_caudate", "dice_mean", "hd95_thalamus", "hd95_caudate"
    ]
    # The input layer was not merged: the adaption learned α for the other layers only.
    alphas = json.loads((run / "alphas.json").read_text())
    assert "encoder.0.conv.conv" not in alphas["layers"] and len(alphas["layers"]) == 14
    # Predictions in each input's shape and affine, with values in the dataset's label set.
    for row in rows:
        case = row["subject"]
        written = nib.load(run / "predictions" / f"{case}.nii.gz")
        image = nib.load(structures / "imagesTr" / f"{case}_0000.nii.gz")
        assert written.shape == image.shape and np.allclose(written.affine, image.affine)
        assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2}
    # portion=100: imagesTs is the prediction set.
    ts = sorted(p.name for p in (run / "predictions" / "validation").glob("*.nii.gz"))
    assert ts == [f"structures_ts{i:03d}.nii.gz" for i in range(1, 11)]
    # `tmerge predict` on imagesTs writes what the run wrote.
    out = tmp_path / "pred"
    assert main(["predict", f"run={run}", f"input={structures / 'imagesTs'}", f"output={out}"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ts
    for name in ts:
        mine, theirs = nib.load(out / name), nib.load(run / "predictions" / "validation" / name)
        assert np.array_equal(mine.affine, theirs.affine)
        assert np.array_equal(np.asarray(mine.dataobj), np.asarray(theirs.dataobj)), name
    # On a machine without the training dataset's root: the run's target.json, loose files.
    loose = tmp_path / "loose"
    shutil.copytree(structures / "imagesTs", loose)
    away = structures.with_name("structures-away")
    structures.rename(away)
    try:
        assert main(["predict", f"run={run}", f"input={loose}", f"output={tmp_path / 'elsewhere'}"]) == 0
    finally:
        away.rename(structures)
    for name in ts:
        mine, theirs = nib.load(tmp_path / "elsewhere" / name), nib.load(run / "predictions" / "validation" / name)
        assert np.array_equal(np.asarray(mine.dataobj), np.asarray(theirs.dataobj)), name
    # export: the JSON describes the channels and the labels in the dataset's values
    assert main(["export", f"run={run}", f"out={tmp_path / 'export'}"]) == 0
    spec = json.loads((tmp_path / "export" / "model.json").read_text())
    assert spec["channels"] == ["syn1", "syn2", "syn3"] and spec["output_mode"] == "softmax"
    assert spec["label_map"] == {"0": "background", "1": "thalamus", "2": "caudate"}
    # the report has a row for it
    assert main(["report", f"runs_dir={runs}", f"out={tmp_path / 'report'}"]) == 0
    table = (tmp_path / "report" / "structures" / "table2.md").read_text()
    assert "structures/report.md" in (tmp_path / "report" / "report.md").read_text()
    assert "structures" in table and "thalamus" in table
