"""Endpoints that are not coins, on tiny examples computed by hand, and their tables in the report."""

from __future__ import annotations

import csv
import statistics

import numpy as np
import pytest

from tmerge.report.endpoints import (
    PAPER_ENDPOINT,
    PRIMARY_ENDPOINT,
    endpoints,
    endpoints_csv,
    endpoints_markdown,
    present_mean,
    record_classes,
    regions_csv,
    voxel_counts,
)
from tmerge.report.runs import discover, read_regions
from tmerge.report.tables import table_inits, table_rows

BRATS = ("ET", "TC", "WT")


def record(subject, dice, truth, pred, classes=BRATS):
    """A per-subject record from per-class tuples of Dice, true and predicted voxel counts."""
    out = {"subject": subject}
    for c, d, t, p in zip(classes, dice, truth, pred, strict=True):
        out |= {f"dice_{c}": d, f"truth_{c}": t, f"pred_{c}": p, f"hd95_{c}": 1.0}
    out["dice_mean"] = sum(dice) / len(dice)
    return out


# s2 and s3 have no enhancing tumour: s2's prediction has none either (Dice ET 1), s3's has 5
# voxels (Dice ET 0). s4's ET is missed (Dice 0, truth 6 voxels).
SUBJECTS = [
    record("s1", (0.8, 0.9, 0.7), (10, 20, 50), (8, 18, 45)),
    record("s2", (1.0, 0.6, 0.8), (0, 15, 40), (0, 10, 38)),
    record("s3", (0.0, 0.5, 0.9), (0, 12, 30), (5, 9, 33)),
    record("s4", (0.0, 0.4, 0.6), (6, 10, 20), (0, 7, 14)),
]


def values(found):
    return {name: (e.value, e.n) for name, e in found.items()}


def test_brats_endpoints_by_hand():
    found = endpoints(SUBJECTS)
    assert list(found) == [
        PRIMARY_ENDPOINT,
        PAPER_ENDPOINT,
        "dice_ET",
        "dice_ET_present",
        "kept_empty_ET",
        "dice_TC",
        "dice_WT",
    ]  # TC and WT are present in every subject: no present-only mean, no kept-empty share
    v = values(found)
    # per subject: s1 (0.8+0.9+0.7)/3 = 0.8, s2 (0.6+0.8)/2 = 0.7, s3 (0.5+0.9)/2 = 0.7,
    # s4 (0+0.4+0.6)/3 = 1/3; mean 2.5333/4
    assert (
        v[PRIMARY_ENDPOINT][0] == pytest.approx((0.8 + 0.7 + 0.7 + 1 / 3) / 4) and v[PRIMARY_ENDPOINT][1] == 4
    )
    # the paper's: s1 0.8, s2 0.8, s3 1.4/3, s4 1/3 → 2.4/4
    assert v[PAPER_ENDPOINT] == (pytest.approx(0.6), 4)
    assert v["dice_ET"] == (pytest.approx(0.45), 4)
    assert v["dice_TC"] == (pytest.approx(0.6), 4)
    assert v["dice_WT"] == (pytest.approx(0.75), 4)
    assert v["dice_ET_present"] == (pytest.approx(0.4), 2)  # s1 0.8, s4 0
    assert v["kept_empty_ET"] == (pytest.approx(0.5), 2)  # s2 kept empty, s3 not


def test_the_primary_endpoint_ignores_the_coin_and_the_paper_mean_does_not():
    """s3 with its 5 stray ET voxels removed: Dice ET 0 → 1. The paper's mean moves by 1/12."""
    fixed = [dict(r) for r in SUBJECTS]
    fixed[2] |= {"dice_ET": 1.0, "pred_ET": 0}
    before, after = values(endpoints(SUBJECTS)), values(endpoints(fixed))
    assert after[PRIMARY_ENDPOINT] == before[PRIMARY_ENDPOINT]
    assert after[PAPER_ENDPOINT][0] - before[PAPER_ENDPOINT][0] == pytest.approx(1 / 12)
    assert after["kept_empty_ET"] == (pytest.approx(1.0), 2)


def test_any_class_names_and_a_subject_without_any_class():
    classes = ("liver", "lesion")
    records = [
        record("a", (0.9, 1.0), (100, 0), (95, 0), classes),
        record("b", (0.8, 0.5), (80, 5), (70, 4), classes),
        record("c", (0.0, 1.0), (0, 0), (3, 0), classes),  # nothing in its truth: no primary score
    ]
    assert record_classes(records[0]) == classes
    assert present_mean(records[2], classes) is None
    v = values(endpoints(records))
    assert v[PRIMARY_ENDPOINT] == (pytest.approx((0.9 + 0.65) / 2), 2)
    assert v[PAPER_ENDPOINT] == (pytest.approx((0.95 + 0.65 + 0.5) / 3), 3)
    assert v["dice_liver_present"] == (pytest.approx(0.85), 2)
    assert v["kept_empty_liver"] == (0.0, 1)  # c predicted 3 liver voxels
    assert v["dice_lesion_present"] == (0.5, 1)
    assert v["kept_empty_lesion"] == (1.0, 2)


def test_without_counts_only_the_score_columns():
    old = [{k: v for k, v in r.items() if not k.startswith(("truth_", "pred_"))} for r in SUBJECTS]
    v = values(endpoints(old))
    assert list(v) == [PAPER_ENDPOINT, "dice_ET", "dice_TC", "dice_WT"]
    assert v[PAPER_ENDPOINT] == (pytest.approx(0.6), 4)


def test_bad_records_are_named():
    with pytest.raises(ValueError, match="at least one"):
        endpoints([])
    with pytest.raises(ValueError, match="s1: truth_ET must be a count"):
        endpoints([SUBJECTS[0] | {"truth_ET": -1}])
    with pytest.raises(ValueError, match="s1 has no dice_XX"):
        endpoints([SUBJECTS[0]], ("XX",))


def test_voxel_counts_and_the_regions_file(tmp_path):
    truth = np.zeros((2, 3, 4), bool)
    truth[0, :2, :2] = True  # 4 voxels of a
    pred = np.zeros((2, 3, 4), np.uint8)
    pred[1, 0, :3] = 1  # 3 voxels of b
    assert voxel_counts(pred, truth, ("a", "b")) == {"truth_a": 4, "truth_b": 0, "pred_a": 0, "pred_b": 3}
    with pytest.raises(ValueError, match=r"\(3, \.\.\.\) masks"):
        voxel_counts(pred, truth, ("a", "b", "c"))
    text = regions_csv(list(reversed(SUBJECTS)), BRATS)
    assert text.splitlines()[:2] == [
        "subject,truth_ET,truth_TC,truth_WT,pred_ET,pred_TC,pred_WT",
        "s1,10,20,50,8,18,45",
    ]
    (tmp_path / "test_regions.csv").write_text(text)
    read = read_regions(tmp_path / "test_regions.csv")
    assert read["s3"] == {
        "truth_ET": 0,
        "truth_TC": 12,
        "truth_WT": 30,
        "pred_ET": 5,
        "pred_TC": 9,
        "pred_WT": 33,
    }


# ---- in the report ----------------------------------------------------------------------------


def scores_and_regions(records):
    keys = ("dice_ET", "dice_TC", "dice_WT", "dice_mean", "hd95_ET", "hd95_TC", "hd95_WT")
    scores = {r["subject"]: {k: r[k] for k in keys} for r in records}
    regions = {r["subject"]: {k: r[k] for k in r if k.startswith(("truth_", "pred_"))} for r in records}
    return scores, regions


def fixed_s3():
    fixed = [dict(r) for r in SUBJECTS]
    fixed[2] |= {"dice_ET": 1.0, "pred_ET": 0, "dice_mean": 0.8}
    return fixed


@pytest.fixture
def runs(fake):
    # timm: seed 0 is SUBJECTS, seed 1 the same with s3's stray ET removed; none at seed 0 only
    for seed, recs in ((0, SUBJECTS), (1, fixed_s3())):
        scores, regions = scores_and_regions(recs)
        fake.target(8, "timm", seed, scores=scores, regions=regions)
    scores, regions = scores_and_regions(SUBJECTS)
    fake.target(8, "none", 0, scores=scores, regions=regions)
    fake.target(8, "none", 1, scores=scores)  # written before the counts existed
    fake.target(4, "timm", scores=scores)  # likewise
    return fake


def section(text, title):
    block = text.split(f"## {title}\n")[1].split("\n## ")[0]
    rows = [ln for ln in block.splitlines() if ln.startswith("| ") and not ln.startswith("| portion")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in rows)}


def test_endpoint_tables_are_mean_and_sd_over_seeds(runs):
    index = discover(runs.root)
    rows = table_rows(index, [4, 8])
    inits = table_inits(index, ["none", "timm"])
    assert inits == ["none", "timm"]
    text = endpoints_markdown(index, rows, inits)
    primary = section(text, "Primary endpoint: Dice of the classes present in each subject's truth")
    sweep = "8 %, seeds 0,1"
    p = (0.8 + 0.7 + 0.7 + 1 / 3) / 4  # the same at both seeds: s3 has no ET
    assert primary[sweep] == ["4", "2", f"{p:.3f} (1/2 seeds)", f"{p:.3f} ± 0.000"]
    assert primary["4 %"][3] == "—"  # no counts: no primary endpoint
    paper = section(text, "Dice, mean of every class over all subjects (the paper's)")
    assert (
        paper[sweep][3]
        == f"{statistics.fmean([0.6, 0.6 + 1 / 12]):.3f} ± {statistics.stdev([0.6, 0.6 + 1 / 12]):.3f}"
    )
    assert paper["4 %"][3] == "0.600"  # the present columns still are shown
    kept = section(text, "ET-empty subjects predicted empty (share)")
    assert kept[sweep][0] == "2" and kept[sweep][3] == f"0.750 ± {statistics.stdev([0.5, 1.0]):.3f}"
    present = section(text, "Dice ET over ET-present subjects")
    assert present[sweep][0] == "2" and present[sweep][3] == "0.400 ± 0.000"
    assert "Dice TC over TC-present subjects" not in text
    assert "Without `test_regions.csv`" in text
    assert "`brats/p4/timm/`" in text and "`brats/p8/seed1/none/`" in text

    lines = list(csv.DictReader(endpoints_csv(index, rows, inits).splitlines()))
    timm = {r["endpoint"]: r for r in lines if r["init"] == "timm" and r["runs"] == "sweep"}
    assert float(timm[PRIMARY_ENDPOINT]["value"]) == pytest.approx(p)
    assert float(timm["kept_empty_ET"]["std"]) == pytest.approx(statistics.stdev([0.5, 1.0]))
    assert timm["kept_empty_ET"]["n_subjects"] == "2" and timm["kept_empty_ET"]["n_runs"] == "2"
    old = {r["endpoint"] for r in lines if r["portion"] == "4"}
    assert old == {PAPER_ENDPOINT, "dice_ET", "dice_TC", "dice_WT"}


def test_without_any_counts_the_table_says_so(fake):
    fake.target(4, "timm")
    index = discover(fake.root)
    text = endpoints_markdown(index, table_rows(index, [4]), ["timm"])
    assert "No run has `test_regions.csv`" in text
    assert "## Primary endpoint" not in text and "## Dice ET over all subjects" in text


def test_unusable_counts_are_a_warning_not_a_broken_run(fake):
    scores, regions = scores_and_regions(SUBJECTS)
    path = fake.target(4, "timm", scores=scores, regions={k: v for k, v in regions.items() if k != "s4"})
    fake.target(4, "none", scores=scores, regions={k: v | {"pred_ET": -2} for k, v in regions.items()})
    index = discover(fake.root)
    timm, none = index.find(4, "timm", None), index.find(4, "none", None)
    assert timm.usable and timm.regions is None and path == timm.path
    assert any("test_regions.csv not used: its subjects" in w for w in timm.warnings)
    assert none.usable and none.regions is None
    assert any("pred_ET must be a voxel count >= 0" in w for w in none.warnings)


def test_the_report_writes_and_links_the_endpoint_tables(runs):
    from tmerge.report import ReportConfig, run_report

    out = run_report(ReportConfig(runs_dir=str(runs.root), bootstrap=50))
    assert "## Primary endpoint" in (out / "endpoints.md").read_text()
    assert (out / "endpoints.csv").read_text().startswith("portion,runs,seeds,init,endpoint,")
    report = (out / "report.md").read_text()
    assert "](endpoints.md)" in report and "](endpoints.csv)" in report


def test_brats2023_nan_dice_is_left_out_of_every_mean_and_of_n():
    """Under metrics.convention=brats2023, s2's ET (empty in truth and prediction) is NaN: the
    means leave it out — dice_ET over s1, s3, s4: (0.8 + 0 + 0)/3; the paper's mean over s2's
    scored TC and WT: (0.6 + 0.8)/2 = 0.7 — and n counts what was averaged."""
    nan_s2 = [dict(r) for r in SUBJECTS]
    nan_s2[1]["dice_ET"] = float("nan")
    v = values(endpoints(nan_s2))
    assert v["dice_ET"] == (pytest.approx(0.8 / 3), 3)
    assert v[PAPER_ENDPOINT] == (pytest.approx((0.8 + 0.7 + 1.4 / 3 + 1 / 3) / 4), 4)
    assert v[PRIMARY_ENDPOINT] == values(endpoints(SUBJECTS))[PRIMARY_ENDPOINT]  # ET absent from s2
    assert v["dice_TC"] == (pytest.approx(0.6), 4)


def test_the_primary_endpoint_is_compared_paired_by_seed(fake):
    """timm − none on the primary endpoint, seed by seed, with the t interval and the MDE, all
    computed here by hand from the records."""
    from scipy import stats

    lowered = {0: 0.3, 1: 0.6, 2: 0.0}  # none's s1 loses this much TC Dice at each seed
    for seed, drop in lowered.items():
        scores, regions = scores_and_regions(SUBJECTS)
        fake.target(8, "timm", seed, scores=scores, regions=regions)
        worse = [dict(r) for r in SUBJECTS]
        worse[0] |= {"dice_TC": 0.9 - drop}
        scores, regions = scores_and_regions(worse)
        fake.target(8, "none", seed, scores=scores, regions=regions)
    index = discover(fake.root)
    text = endpoints_markdown(index, table_rows(index, []), ["none", "timm"])
    block = text.split("### The primary endpoint, paired by seed\n")[1].split("\n## ")[0]
    line = next(ln for ln in block.splitlines() if "timm − none" in ln)
    # s1 has all three classes: its primary value drops by drop/3, the mean over 4 subjects by drop/12
    diffs = [d / 12 for d in lowered.values()]  # 0.025, 0.05, 0
    mean, sd, n = statistics.fmean(diffs), statistics.stdev(diffs), 3
    half = stats.t.ppf(0.975, n - 1) * sd / n**0.5
    mde = (stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * sd / n**0.5
    assert f"| {mean:.3f} ± {sd:.3f} (3) | [{mean - half:+.3f}, {mean + half:+.3f}] | {mde:.3f} |" in line
    assert line.startswith("| 8 %, seeds 0,1,2 | timm − none |")
