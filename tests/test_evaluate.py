"""Test-set evaluation in original geometry: label maps, Dice/HD95 per region, NIfTI export,
the result files, and SegmentationModule's test/predict steps."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tmerge.callbacks import PredictionWriter
from tmerge.data.datasets import Subject, VolumeDataset, collate_volumes
from tmerge.data.geometry import uncrop, voxel_spacing
from tmerge.data.labels import REGIONS, brats_regions
from tmerge.data.preprocess import PreprocessSettings, preprocess_subject
from tmerge.data.schemes import BRATS_SCHEME, LabelScheme
from tmerge.evaluate import (
    MetricsConfig,
    dice_summary,
    evaluate_subject,
    format_summary,
    per_subject_rows,
    prediction_file,
    preview,
    save_prediction,
    score_label_maps,
    summarise,
)
from tmerge.metrics import max_distance
from tmerge.modules.segmentation import SegmentationModule
from tmerge.stages.results import write_test_results

# An anisotropic, oblique, off-origin geometry, so nothing can pass by assuming 1 mm, a cube or
# the identity.
SHAPE = (40, 36, 30)
SPACING = (1.5, 2.0, 3.0)


def _affine() -> np.ndarray:
    angle = np.deg2rad(10)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(SPACING)
    affine[:3, 3] = (-30.0, 12.5, -40.0)
    return affine


def _ball(centre, radius) -> np.ndarray:
    grid = np.indices(SHAPE).astype(float)
    return sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) < radius**2


def _brats_subject(folder: Path, name: str, labelled: bool = True) -> tuple[dict[str, Path], Path | None]:
    """A BraTS-layout subject: four modalities of a ball-shaped 'brain' off the grid's centre and
    a nested tumour (oedema 2 ⊃ core 1 ⊃ enhancing 4)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    brain = _ball((22, 17, 14), 12)
    seg = np.zeros(SHAPE, np.int16)
    seg[_ball((24, 18, 15), 6)] = 2
    seg[_ball((24, 18, 15), 4)] = 1
    seg[_ball((25, 18, 15), 2)] = 4
    files = {}
    for m, base in (("t1", 50), ("t1ce", 60), ("t2", 70), ("flair", 80)):
        data = np.where(brain, base + 20 * seg + rng.normal(0, 2, SHAPE), 0).astype(np.float32)
        files[m] = folder / f"{name}_{m}.nii.gz"
        nib.save(nib.Nifti1Image(data, _affine()), files[m])
    if not labelled:
        return files, None
    label = folder / f"{name}_seg.nii.gz"
    nib.save(nib.Nifti1Image(seg, _affine()), label)
    return files, label


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """``(Preprocessed, files, seg file)`` of one hand-made BraTS subject (no N4: fast)."""
    folder = tmp_path_factory.mktemp("brats") / "Brats18_TEST_0001_1"
    files, label = _brats_subject(folder, folder.name)
    pre = preprocess_subject(files, label, "brats", PreprocessSettings(multiple=16, min_size=16), subject=folder.name)
    assert pre.image.shape[1:] != SHAPE  # the crop really changed the grid
    return pre, files, label


def _perfect_logits(target: np.ndarray) -> torch.Tensor:
    """Region logits ``(3, D, H, W)`` that reproduce a region target exactly."""
    return torch.from_numpy(target.astype(np.float32) * 10 - 5)


def test_label_maps_from_outputs_and_targets():
    seg = np.array([0, 1, 2, 4, 2, 0], dtype=np.uint8).reshape(1, 1, 6)
    regions = brats_regions(seg)
    assert np.array_equal(BRATS_SCHEME.label_map(regions.astype(np.float32)), seg)
    assert np.array_equal(BRATS_SCHEME.target_label_map(regions.astype(np.float32)), seg)
    # Non-nested predicted regions: the innermost present wins (ET over TC over WT).
    assert BRATS_SCHEME.label_map(np.array([1, 0, 0]).reshape(3, 1, 1, 1)).item() == 4
    onehot = np.eye(3)[[0, 2, 1]].T.reshape(3, 1, 1, 3)
    assert LabelScheme.plain(["a", "b"]).label_map(onehot).ravel().tolist() == [0, 2, 1]
    with pytest.raises(ValueError, match="BraTS regions"):
        score_label_maps(seg, seg, "sigmoid", ["a", "b"])


def test_scores_are_taken_in_original_geometry(subject):
    pre, _, label_file = subject
    target = brats_regions(pre.label)
    truth = nib.load(str(label_file)).get_fdata().astype(np.uint8)
    # The crop keeps every labelled voxel, so the target put back is the original label map.
    assert np.array_equal(uncrop(pre.label, pre.meta), truth)

    result = evaluate_subject(_perfect_logits(target), target, pre.meta, "sigmoid", list(REGIONS))
    assert result.labels.shape == SHAPE and np.array_equal(result.labels, truth)
    np.testing.assert_allclose(result.spacing, SPACING)
    assert all(result.scores[f"dice_{r}"] == 1.0 and result.scores[f"hd95_{r}"] == 0.0 for r in REGIONS)

    # A prediction moved by one voxel along the last axis: HD95 is that axis' 3 mm, not 1 voxel.
    shifted = np.roll(target, 1, axis=-1)
    result = evaluate_subject(_perfect_logits(shifted), target, pre.meta, "sigmoid", list(REGIONS))
    for r in REGIONS:
        assert result.scores[f"hd95_{r}"] == pytest.approx(SPACING[2])
        assert 0.0 < result.scores[f"dice_{r}"] < 1.0


def test_padding_predictions_are_dropped_and_empty_regions_follow_brats(subject):
    pre, _, _ = subject
    target = brats_regions(pre.label)
    logits = _perfect_logits(target)
    logits[:, 0, 0, 0] = 5.0  # a corner of the padded grid: outside the original image
    assert pre.meta["pad_before"][0] > 0
    result = evaluate_subject(logits, target, pre.meta, "sigmoid", list(REGIONS))
    assert result.scores["dice_WT"] == 1.0 and result.scores["hd95_WT"] == 0.0

    nothing = torch.full_like(logits, -5.0)
    result = evaluate_subject(nothing, target, pre.meta, "sigmoid", list(REGIONS))
    diagonal = max_distance(SHAPE, SPACING)
    assert result.scores["dice_ET"] == 0.0 and result.scores["hd95_ET"] == pytest.approx(diagonal)
    # A subject without enhancing tumour (as many LGGs): predicting none scores Dice 1, HD95 0.
    no_et = target.copy()
    no_et[0] = 0
    result = evaluate_subject(_perfect_logits(no_et), no_et, pre.meta, "sigmoid", list(REGIONS))
    assert result.scores["dice_ET"] == 1.0 and result.scores["hd95_ET"] == 0.0


def test_exported_prediction_has_the_input_geometry(subject, tmp_path):
    pre, files, label_file = subject
    target = brats_regions(pre.label)
    result = evaluate_subject(_perfect_logits(target), None, pre.meta, "sigmoid", list(REGIONS))
    assert result.scores == {} and result.truth is None
    path = save_prediction(tmp_path, "Brats18_TEST_0001_1", result.labels, pre.meta)
    assert path == prediction_file(tmp_path, "Brats18_TEST_0001_1") == tmp_path / "Brats18_TEST_0001_1.nii.gz"

    written, original = nib.load(str(path)), nib.load(str(files["t1"]))
    assert written.shape == original.shape == SHAPE
    np.testing.assert_allclose(written.affine, original.affine, atol=1e-6)
    assert written.get_data_dtype() == np.uint8
    labels = np.asarray(written.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2, 4}
    assert np.array_equal(labels, nib.load(str(label_file)).get_fdata().astype(np.uint8))


def test_preview_takes_the_slice_with_most_tumour(subject):
    pre, _, _ = subject
    target = brats_regions(pre.label)
    result = evaluate_subject(_perfect_logits(target), target, pre.meta, "sigmoid", list(REGIONS))
    view = preview(torch.from_numpy(pre.image), result, pre.meta, "s")
    areas = (result.truth > 0).sum(axis=(0, 1))
    assert areas[view["slice"]] == areas.max() > 0
    assert np.array_equal(view["truth"], result.truth[..., view["slice"]])
    assert view["image"].shape == view["truth"].shape == view["prediction"].shape == SHAPE[:2]
    assert 0.0 <= view["image"].min() and view["image"].max() <= 1.0


def test_result_files_have_the_fixed_formats(tmp_path):
    records = [
        {
            "subject": "b",
            "dice_ET": 0.0,
            "dice_TC": 0.5,
            "dice_WT": 1.0,
            "hd95_ET": 373.13,
            "hd95_TC": 4,
            "hd95_WT": 0,
        },
        {
            "subject": "a",
            "dice_ET": 1.0,
            "dice_TC": 0.5,
            "dice_WT": 0.0,
            "hd95_ET": 0.0,
            "hd95_TC": 2,
            "hd95_WT": 9,
        },
    ]
    summary = write_test_results(tmp_path, records, list(REGIONS))
    with open(tmp_path / "test_per_subject.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == "subject,dice_ET,dice_TC,dice_WT,dice_mean,hd95_ET,hd95_TC,hd95_WT".split(",")
    assert [r[0] for r in rows[1:]] == ["a", "b"]  # sorted by subject
    assert float(rows[1][4]) == pytest.approx(0.5)  # dice_mean of a
    assert json.loads((tmp_path / "test_summary.json").read_text()) == summary
    assert summary == {
        "n": 2,
        "dice": {"ET": 0.5, "TC": 0.5, "WT": 0.5, "mean": 0.5},
        "hd95": {"ET": pytest.approx(186.565), "TC": 3.0, "WT": 4.5},
    }
    assert per_subject_rows(records, list(REGIONS))[0]["subject"] == "a"
    assert summarise([], list(REGIONS))["dice"]["mean"] is None
    assert format_summary(summary).startswith("Dice ET 0.500, TC 0.500, WT 0.500, mean 0.500; HD95 ET 186.6")


def test_brats2023_summary_leaves_nan_out_of_the_means_and_counts_it(tmp_path):
    """Under metrics.convention=brats2023 a region empty in both maps is NaN: each mean is over the
    other subjects (by hand below), the per-subject Dice mean over the scored regions, and the
    summary counts the left-out subjects per region in ``n_empty``; brats2018 has no such key."""
    nan = math.nan
    records = [
        {"subject": "a", "dice_ET": nan, "dice_TC": 0.5, "dice_WT": 1.0, "hd95_ET": nan, "hd95_TC": 4.0, "hd95_WT": 0.0},
        {"subject": "b", "dice_ET": 0.8, "dice_TC": nan, "dice_WT": 0.6, "hd95_ET": 2.0, "hd95_TC": nan, "hd95_WT": 6.0},
    ]  # fmt: skip
    summary = write_test_results(tmp_path, records, list(REGIONS), "brats2023")
    assert summary == {
        "n": 2,
        "dice": {"ET": 0.8, "TC": 0.5, "WT": pytest.approx(0.8), "mean": pytest.approx((0.75 + 0.7) / 2)},
        "hd95": {"ET": 2.0, "TC": 4.0, "WT": 3.0},
        "n_empty": {"ET": 1, "TC": 1, "WT": 0},
    }
    rows = list(csv.DictReader((tmp_path / "test_per_subject.csv").open()))
    assert rows[0]["dice_ET"] == "nan" and float(rows[0]["dice_mean"]) == pytest.approx(0.75)
    assert "empty in both, left out: ET 1, TC 1, WT 0" in format_summary(summary)
    all_empty = [{**records[0], "dice_ET": nan, "dice_TC": nan, "dice_WT": nan}]
    assert summarise(all_empty, list(REGIONS), "brats2023")["dice"] == dict.fromkeys((*REGIONS, "mean"))
    assert "n_empty" not in summarise(records[:0], list(REGIONS))
    # Dice alone (a learning-curve point): the same numbers without any hd95 key
    dice_only = [{k: v for k, v in r.items() if not k.startswith("hd95")} for r in records]
    assert dice_summary(dice_only, list(REGIONS)) == summary["dice"]


def test_dice_only_scoring_skips_hd95_and_keeps_the_dice(tmp_path):
    """``hd95=False`` (learning-curve points): the same Dice, no surface distances."""
    truth = np.zeros((12, 10, 8), np.uint8)
    truth[2:8, 2:7, 2:6] = 2
    truth[3:6, 3:6, 3:5] = 4
    pred = np.zeros_like(truth)
    pred[3:9, 2:7, 2:6] = 2
    pred[4:6, 3:6, 3:5] = 4
    full = score_label_maps(pred, truth, "sigmoid", list(REGIONS), spacing=(1.0, 1.5, 2.0))
    dice = score_label_maps(pred, truth, "sigmoid", list(REGIONS), spacing=(1.0, 1.5, 2.0), hd95=False)
    assert dice == {k: v for k, v in full.items() if k.startswith("dice_")} and len(dice) == 3
    assert dice["dice_WT"] == pytest.approx(2 * 5 * 5 * 4 / (6 * 5 * 4 * 2))  # 5 of 6 slabs overlap
    assert "hd95_WT" in full and full["hd95_WT"] > 0


class _Threshold(torch.nn.Module):
    """A stand-in network: region logits from the last input channel (no training needed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, -1:] - 0.8).repeat(1, 3, 1, 1, 1) * 10


def test_module_tests_in_original_geometry_and_exports(subject, tmp_path):
    pre, files, label_file = subject
    item = Subject("Brats18_TEST_0001_1", pre.image, brats_regions(pre.label).astype(np.uint8), pre.meta)
    loader = DataLoader(VolumeDataset([item], torch.float32), batch_size=1, collate_fn=collate_volumes)
    module = SegmentationModule(_Threshold(), output_mode="sigmoid", class_names=list(REGIONS), patch_size=16)
    writer = PredictionWriter(test_dir=tmp_path / "predictions", predict_dir=tmp_path / "predictions" / "validation")
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[writer]
    )
    metrics = trainer.test(module, dataloaders=loader, verbose=False)[0]

    [record] = module.test_records
    assert set(record) == {"subject", *(f"{k}_{r}" for k in ("dice", "hd95", "truth", "pred") for r in REGIONS)}
    written = tmp_path / "predictions" / "Brats18_TEST_0001_1.nii.gz"
    img = nib.load(str(written))
    assert img.shape == SHAPE and np.allclose(img.affine, nib.load(str(files["t1"])).affine)
    # The scores are those of the written file against the original label file.
    expected = score_label_maps(
        np.asarray(img.dataobj),
        nib.load(str(label_file)).get_fdata().astype(np.uint8),
        "sigmoid",
        REGIONS,
        voxel_spacing(img.affine),
    )
    truth_map = nib.load(str(label_file)).get_fdata().astype(np.uint8)
    pred_map = np.asarray(img.dataobj)
    counts = {
        **{f"truth_{r}": int(m.sum()) for r, m in zip(REGIONS, brats_regions(truth_map), strict=True)},
        **{f"pred_{r}": int(m.sum()) for r, m in zip(REGIONS, brats_regions(pred_map), strict=True)},
    }
    assert record == pytest.approx({"subject": record["subject"], **expected, **counts})
    assert metrics["test/dice"] == pytest.approx(np.mean([expected[f"dice_{r}"] for r in REGIONS]))
    assert metrics["test/hd95_WT"] == pytest.approx(expected["hd95_WT"])
    assert len(module.test_previews) == 1

    # predict: unlabelled volumes are exported the same way.
    unlabelled = Subject("Brats18_TEST_0002_1", pre.image, None, pre.meta)
    loader = DataLoader(VolumeDataset([unlabelled], torch.float32), batch_size=1, collate_fn=collate_volumes)
    [[predicted]] = trainer.predict(module, dataloaders=loader)
    assert predicted.subject == "Brats18_TEST_0002_1" and predicted.labels.shape == SHAPE
    again = nib.load(str(tmp_path / "predictions" / "validation" / "Brats18_TEST_0002_1.nii.gz"))
    assert again.shape == SHAPE and np.array_equal(np.asarray(again.dataobj), np.asarray(img.dataobj))


class _Nothing(torch.nn.Module):
    """A stand-in network that predicts no tumour anywhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0], 3, *x.shape[2:]), -10.0)


def test_module_scores_by_its_metrics_config(subject):
    """metrics.convention=brats2023 through the module: a region empty in truth and prediction
    is NaN and not logged, a missed one scores Dice 0 and HD95 373.13 mm (not this small image's
    diagonal, as brats2018 gives)."""
    pre, _, _ = subject
    regions = brats_regions(pre.label).astype(np.uint8)
    regions[0] = 0  # no enhancing tumour in this subject
    item = Subject("Brats18_TEST_0003_1", pre.image, regions, pre.meta)
    loader = DataLoader(VolumeDataset([item], torch.float32), batch_size=1, collate_fn=collate_volumes)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    logged = {}
    for convention in ("brats2018", "brats2023"):
        module = SegmentationModule(
            _Nothing(),
            output_mode="sigmoid",
            class_names=list(REGIONS),
            patch_size=16,
            metrics=MetricsConfig(convention=convention),
        )
        logged[convention] = trainer.test(module, dataloaders=loader, verbose=False)[0]
        [record] = module.test_records
        if convention == "brats2023":
            assert math.isnan(record["dice_ET"]) and math.isnan(record["hd95_ET"])
            assert record["hd95_WT"] == pytest.approx(373.1287, abs=1e-3)
    diagonal = max_distance(SHAPE, SPACING)
    assert logged["brats2018"]["test/dice_ET"] == 1.0
    assert logged["brats2018"]["test/hd95_WT"] == pytest.approx(diagonal)
    assert "test/dice_ET" not in logged["brats2023"] and "test/hd95_ET" not in logged["brats2023"]
    assert logged["brats2023"]["test/dice"] == 0.0  # TC and WT missed; ET left out
    assert logged["brats2023"]["test/hd95"] == pytest.approx(373.1287, abs=1e-3)


def test_metrics_config_is_checked_and_composed_into_a_target_run() -> None:
    from tmerge.config import compose
    from tmerge.errors import ConfigError
    from tmerge.stages.configs import TargetStageConfig

    assert TargetStageConfig().metrics == MetricsConfig(hd95="pooled", convention="brats2018")
    cfg = compose(TargetStageConfig, overrides=["metrics.hd95=directed", "metrics.convention=brats2023"])
    assert cfg.metrics == MetricsConfig(hd95="directed", convention="brats2023")
    with pytest.raises(ConfigError, match="metrics.hd95: expected one of pooled, directed, got 'max'"):
        compose(TargetStageConfig, overrides=["metrics.hd95=max"])
    with pytest.raises(ConfigError, match="metrics.convention: expected one of brats2018, brats2023"):
        MetricsConfig(convention="brats2021")
