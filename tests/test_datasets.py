"""End to end on the tiny generated BraTS set in every dataset layout, through the CLI: BraTS
2018 (the embedded default's), 2021, 2023 and nnU-Net v2 raw give the same test scores for the
same cases and seed, and predictions in each case's geometry and each layout's label values; an
anisotropic, LAS-stored copy runs with ``data.spacing``/``data.orientation``; a parcellation
source in nnU-Net v2 raw trains as task1 (and task2), and T-IMM runs from those sources on BraTS
2023.

The converted layouts keep the sorted order of the case ids (tests/helpers/layouts.py), so the seeded
splits draw the same cases in each.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import layouts
from helpers.tiny_settings import TINY_ARGS

from tmerge.cli import main

pytestmark = pytest.mark.slow

TINY = list(TINY_ARGS)
LAYOUTS = ("brats2018", "brats2021", "brats2023", "nnunet")
# Written label values of each layout (the generated tumours have every label).
CONVENTION = {
    "brats2018": {0, 1, 2, 4},
    "brats2021": {0, 1, 2, 4},
    "brats2023": {0, 1, 2, 3},
    "nnunet": {0, 1, 2, 3},
    "anisotropic": {0, 1, 2, 4},
}


@pytest.fixture(scope="module")
def roots(tiny_default, tmp_path_factory) -> dict[str, tuple[Path, dict[str, str]]]:
    """layout → (root, {case id: BraTS 2018 id})."""
    base = tmp_path_factory.mktemp("layouts")
    src = tiny_default / "brats"
    labelled, unlabelled = layouts.brats2018_cases(src)
    out = {"brats2018": (src, {s: s for s in [*labelled, *unlabelled]})}
    out["brats2021"] = (base / "brats2021", layouts.to_brats2021(src, base / "brats2021"))
    out["brats2023"] = (base / "brats2023", layouts.to_brats2023(src, base / "brats2023"))
    out["nnunet"] = (base / "Dataset001_BraTS", layouts.to_nnunet(src, base / "Dataset001_BraTS"))
    layouts.anisotropic(base / "brats2021", base / "anisotropic")
    out["anisotropic"] = (base / "anisotropic", out["brats2021"][1])
    return out


def target_args(root: Path, runs: Path) -> list[str]:
    return [
        f"data.root={root}",
        f"runs_dir={runs}",
        "portion=50",
        "data.test_size=8",
        "data.pool_size=16",
        "adaption.max_epochs=1",
        *TINY,
    ]


@pytest.fixture(scope="module")
def none_runs(roots, tmp_path_factory) -> dict[str, Path]:
    """``tmerge target init=none`` on every layout (the anisotropic one resampled back to the
    generated data's 6 mm and to RAS): layout → run folder."""
    runs = {}
    for name, (root, _) in roots.items():
        folder = tmp_path_factory.mktemp(f"runs-{name}")
        args = target_args(root, folder)
        if name == "anisotropic":
            args += ["data.spacing=[6,6,6]", "data.orientation=RAS"]
        assert main(["target", "init=none", *args]) == 0, name
        runs[name] = folder / "brats" / "p50" / "none"
    return runs


def _scores(run: Path, ids: dict[str, str]) -> dict[str, dict[str, str]]:
    with open(run / "test_per_subject.csv") as f:
        return {ids[row.pop("subject")]: row for row in csv.DictReader(f)}


def _inputs(root: Path, name: str, case: str) -> Path:
    """The first input image of ``case`` in ``root``."""
    pattern = {
        "brats2018": f"*/*/{case}/{case}_t1.nii.gz",
        "brats2021": f"{case}/{case}_t1.nii.gz",
        "anisotropic": f"{case}/{case}_t1.nii.gz",
        "brats2023": f"{case}/{case}-t1n.nii.gz",
        "nnunet": f"imagesTr/{case}_0000.nii.gz",
    }[name]
    [found] = root.glob(pattern)
    return found


def test_every_layout_runs_and_scores_the_same_cases_alike(roots, none_runs) -> None:
    reference = _scores(none_runs["brats2018"], roots["brats2018"][1])
    assert len(reference) == 8
    for name in LAYOUTS[1:]:
        assert _scores(none_runs[name], roots[name][1]) == reference, name
    summaries = {n: json.loads((none_runs[n] / "test_summary.json").read_text()) for n in LAYOUTS}
    assert all(s == summaries["brats2018"] for s in summaries.values())
    # The splits drew the same cases in the same order; the records name them in each layout's ids.
    tests = {}
    for name in LAYOUTS:
        record = json.loads((none_runs[name] / "splits.json").read_text())
        tests[name] = [roots[name][1][s] for s in record["test"]]
    assert all(t == tests["brats2018"] for t in tests.values()) and sorted(tests["brats2018"]) == sorted(
        reference
    )
    anisotropic = json.loads((none_runs["anisotropic"] / "test_summary.json").read_text())
    assert anisotropic["n"] == 8 and all(0 <= v <= 1 for v in anisotropic["dice"].values())


def test_predictions_have_their_inputs_geometry_and_the_layouts_labels(roots, none_runs) -> None:
    for name, run in none_runs.items():
        root, ids = roots[name]
        files = sorted((run / "predictions").glob("*.nii.gz"))
        assert len(files) == 8, name
        values: set[int] = set()
        for f in files:
            case = f.name[: -len(".nii.gz")]
            written, original = nib.load(f), nib.load(_inputs(root, name, case))
            assert written.shape == original.shape and np.allclose(written.affine, original.affine), (
                name,
                case,
            )
            values |= set(np.unique(np.asarray(written.dataobj)).tolist())
        assert values <= CONVENTION[name] and values - {0}, (name, values)
        if name in ("brats2023", "nnunet"):
            assert 4 not in values
    # The anisotropic copy's predictions are on its own 6 × 6 × 12 mm, LAS grid.
    f = next((none_runs["anisotropic"] / "predictions").glob("*.nii.gz"))
    assert nib.aff2axcodes(nib.load(f).affine) == ("L", "A", "S") and nib.load(f).shape[2] == 16


def test_full_portion_predicts_each_layouts_unlabelled_set(roots, tmp_path) -> None:
    """portion=100 on BraTS 2023: the case folders without a seg file are the prediction set,
    written with 3 for enhancing under their case ids."""
    root, ids = roots["brats2023"]
    args = [a.replace("portion=50", "portion=100") for a in target_args(root, tmp_path)]
    assert main(["target", "init=none", *args]) == 0
    exported = sorted(
        p.name for p in (tmp_path / "brats" / "p100" / "none" / "predictions" / "validation").iterdir()
    )
    assert exported == ["BraTS-GLI-09000-000.nii.gz", "BraTS-GLI-09001-000.nii.gz"]
    assert [ids[e[: -len(".nii.gz")]] for e in exported] == ["Brats18_SYNV_0001_1", "Brats18_SYNV_0002_1"]


def test_nnunet_parcellation_source_trains_as_task1_and_feeds_timm(tiny_default, roots, tmp_path) -> None:
    """An HCP-like parcellation source in nnU-Net v2 raw (channels T1, T2; labels the paper's
    classes) trains as task1 exactly as the HCP layout does; task2 follows from it, and T-IMM
    merges the two for BraTS 2023."""
    hcp = tmp_path / "Dataset002_HCP"
    layouts.hcp_to_nnunet(tiny_default / "hcp", hcp)
    runs, reference = tmp_path / "runs", tmp_path / "reference"
    assert main(["task1", f"data.root={hcp}", f"runs_dir={runs}", *TINY]) == 0
    assert main(["task1", f"data.root={tiny_default / 'hcp'}", f"runs_dir={reference}", *TINY]) == 0
    got = json.loads((runs / "task1" / "metrics.json").read_text())
    want = json.loads((reference / "task1" / "metrics.json").read_text())
    assert got["val_dice_per_class"] == want["val_dice_per_class"] and len(got["val_dice_per_class"]) == 7
    assert main(["task2", f"data.root={hcp}", f"runs_dir={runs}", *TINY]) == 0
    assert main(["timm", *target_args(roots["brats2023"][0], runs)]) == 0
    run = runs / "brats" / "p50" / "timm"
    assert json.loads((run / "test_summary.json").read_text())["n"] == 8
    assert json.loads((run / "alphas.json").read_text())["sources"] == ["task1", "task2"]
    written = np.asarray(nib.load(next((run / "predictions").glob("*.nii.gz"))).dataobj)
    assert set(np.unique(written).tolist()) <= {0, 1, 2, 3}
    # The same T-IMM from the same sources on every other layout: the same scores, case by case.
    expected = _scores(run, roots["brats2023"][1])
    for name in ("brats2018", "brats2021", "nnunet"):
        layout_runs = tmp_path / f"runs-{name}"
        for source in ("task1", "task2"):
            shutil.copytree(runs / source, layout_runs / source)
        assert main(["timm", *target_args(roots[name][0], layout_runs)]) == 0, name
        assert _scores(layout_runs / "brats" / "p50" / "timm", roots[name][1]) == expected, name
