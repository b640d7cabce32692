"""Reading run folders and assembling Tables 2–4 from them: missing and unfinished runs are shown
as such, numbers come from the per-subject CSVs, sweeps are aggregated across seeds."""

from __future__ import annotations

import csv
import json
import statistics

import pytest

from tmerge.errors import RunError
from tmerge.report.runs import SCORE_COLUMNS, SINGLE, SWEEP, discover, init_order, read_per_subject
from tmerge.report.tables import (
    MISSING,
    Row,
    metric_cell,
    row_runs,
    table2_csv,
    table2_markdown,
    table3_markdown,
    table4_markdown,
    table_inits,
    table_rows,
)

INITS = ["none", "m1", "m2", "imm", "timm"]


def csv_mean(path, column):
    """The mean of a per-subject column, read without the report's code."""
    with open(path) as f:
        values = [float(r[column]) for r in csv.DictReader(f)]
    return statistics.fmean(v for v in values if v == v)


def md_rows(text: str, section: str) -> dict[str, list[str]]:
    """The rows of one ``## section`` table of a Markdown file: first cell → other cells."""
    block = text.split(f"## {section}")[1].split("\n## ")[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("| ") and not ln.startswith("| portion")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines)}


@pytest.fixture
def index(fake):
    for init in ("none", "m2", "imm"):
        fake.target(4, init)
    fake.target(4, "timm", offset=0.03)
    fake.target(4, "m1", finished=False)  # unfinished: no test_summary.json
    fake.target(8, "timm", offset=0.03)
    for seed in (0, 1, 2):
        fake.target(8, "none", seed)
        if seed != 2:  # seed 2 of timm never ran
            fake.target(8, "timm", seed, offset=0.03)
    return discover(fake.root)


def test_discovery_marks_unfinished_runs_and_reads_seeds(index):
    assert len(index.targets) == 11
    unfinished = [r for r in index.targets if not r.finished]
    assert [(r.portion, r.init) for r in unfinished] == [(4, "m1")]
    assert "unfinished" in unfinished[0].status() and unfinished[0].per_subject == {}
    assert index.seeds(8) == [0, 1, 2] and index.seeds(4) == []
    assert {r.group for r in index.targets} == {SINGLE, SWEEP}


def test_rows_and_columns(index):
    rows = table_rows(index, [4, 8, 100])
    assert rows == [Row(4, SINGLE), Row(8, SINGLE), Row(8, SWEEP, (0, 1, 2)), Row(100, SINGLE)]
    assert table_inits(index, ["none", "timm"]) == INITS  # m1 found on disk (unfinished), m2/imm too


def test_a_portion_found_only_in_sweeps_gets_no_single_seed_row(fake):
    """Rows for portions nobody asked for come from the folders found: 4 % has a single-seed run,
    8 % seed folders only (the benchmark's layout), so its empty single-seed row is left out."""
    fake.target(4, "none")
    for seed in (0, 1):
        fake.target(8, "none", seed=seed)
    index = discover(fake.root)
    assert table_rows(index, []) == [Row(4, SINGLE), Row(8, SWEEP, (0, 1))]
    assert table_rows(index, [8]) == [Row(4, SINGLE), Row(8, SINGLE), Row(8, SWEEP, (0, 1))]


def test_table2_numbers_match_the_per_subject_csvs(index, fake):
    rows = table_rows(index, [4])
    text = table2_markdown(index, rows, INITS)
    main = md_rows(text, "Dice, mean of ET, TC and WT")["4 %"]
    assert main[0] == "10"  # n test subjects
    assert main[1] == "1"  # seeds: the single-seed layout
    for init, cell in zip(INITS, main[2:], strict=True):
        if init == "m1":
            assert cell == MISSING  # unfinished: never used
            continue
        expected = csv_mean(fake.root / "brats" / "p4" / init / "test_per_subject.csv", "dice_mean")
        assert cell == f"{expected:.3f}"
    table = {
        (r["portion"], r["runs"], r["init"], r["metric"]): r
        for r in csv.DictReader(table2_csv(index, rows, INITS).splitlines())
    }
    for column in ("dice_ET", "dice_mean", "hd95_TC"):
        expected = csv_mean(fake.root / "brats" / "p4" / "timm" / "test_per_subject.csv", column)
        assert float(table[("4", "single", "timm", column)]["value"]) == pytest.approx(expected, abs=1e-12)
    assert table[("4", "single", "m1", "dice_mean")]["value"] == ""
    assert table[("4", "single", "m1", "dice_mean")]["n_runs"] == "0"


def test_non_finite_hd95_is_left_out_and_counted(index):
    run = row_runs(index, Row(4, SINGLE), "timm")
    cell = metric_cell(run, "hd95_WT")
    assert cell.left_out == 1  # the first fake subject has an empty mask
    assert cell.value == pytest.approx(statistics.fmean(5.0 + i for i in range(1, 10)))
    assert "(1 n/a)" in cell.format(1)


def test_sweep_is_mean_and_std_across_seeds(index, fake):
    rows = table_rows(index, [8])
    text = table2_markdown(index, rows, INITS)
    main = md_rows(text, "Dice, mean of ET, TC and WT")
    per_seed = [
        csv_mean(fake.root / "brats" / "p8" / f"seed{s}" / "none" / "test_per_subject.csv", "dice_mean")
        for s in (0, 1, 2)
    ]
    sweep = main["8 %, seeds 0,1,2"]
    assert sweep[1] == "3"  # the number of seeds is stated
    assert sweep[2] == f"{statistics.fmean(per_seed):.3f} ± {statistics.stdev(per_seed):.3f}"
    assert sweep[INITS.index("timm") + 2].endswith("(2/3 seeds)")
    assert sweep[INITS.index("m1") + 2] == MISSING
    # the single-seed row of the same portion is reported next to it, separately
    single = csv_mean(fake.root / "brats" / "p8" / "timm" / "test_per_subject.csv", "dice_mean")
    assert main["8 %"][INITS.index("timm") + 2] == f"{single:.3f}"


def test_table3_reads_the_stages(index):
    text = table3_markdown(index, table_rows(index, [4]), INITS, "timm")
    timm = md_rows(text, "timm (paper Table 3)")
    assert timm["4 %"] == ["6", "5", "0.310", "0.700", "12", "7", "0.430"]
    assert timm["8 %, seeds 0,1,2"][0] == "6.5 ± 0.7 (2/3 seeds)"
    assert all(c == MISSING for c in timm["100 %"]) if "100 %" in timm else True
    finetune = md_rows(text, "Fine-tune stage")
    assert finetune["4 %"][INITS.index("m1")] == MISSING
    assert finetune["4 %"][INITS.index("none")] == "12 / 0.400"


def test_table4_from_forgetting_json(fake):
    fake.forgetting(4, examples=False)
    text = table4_markdown(discover(fake.root).forgetting)
    rows = md_rows(text, "4 %")
    assert rows["T-IMM"] == ["0.500", "0.390"] and rows["M1"] == ["0.890", "0.000"]
    assert "No `forgetting" in table4_markdown([])


def test_table4_row_left_out_by_the_stage_is_missing(fake):
    path = fake.forgetting(8, examples=False)
    table = json.loads((path / "table4.json").read_text())
    del table["T-IMM"]
    (path / "table4.json").write_text(json.dumps(table))
    rows = md_rows(table4_markdown(discover(fake.root).forgetting), "8 %")
    assert rows["T-IMM"] == [MISSING, MISSING]


def test_per_subject_columns_and_init_order_are_the_stages_own():
    """The report reads the columns the evaluation writes, and orders initialisations as the
    registry lists them (the paper's Table 2 first)."""
    from tmerge.data.labels import REGIONS
    from tmerge.evaluate import score_columns
    from tmerge.stages.inits import INITS

    assert REGIONS == ("ET", "TC", "WT")
    expected = ("dice_ET", "dice_TC", "dice_WT", "dice_mean", "hd95_ET", "hd95_TC", "hd95_WT")
    assert SCORE_COLUMNS == tuple(score_columns(REGIONS)) == expected
    assert init_order() == tuple(INITS)
    assert init_order()[:7] == ("none", "m1", "m2", "imm", "mean-imm", "mean-timm", "timm")


def test_per_subject_csv_is_read_as_written(fake):
    path = fake.target(4, "none")
    rows = read_per_subject(path / "test_per_subject.csv")
    assert list(rows) == sorted(rows) and len(rows) == 10
    first = next(iter(rows.values()))
    assert tuple(first) == SCORE_COLUMNS
    assert first["hd95_WT"] != first["hd95_WT"]  # NaN: the fixture's first subject has an empty mask


def test_broken_finished_run_is_listed_not_used(fake):
    path = fake.target(4, "imm")
    (path / "test_per_subject.csv").write_text("subject,foo\nx,1\n")
    run = discover(fake.root).targets[0]
    assert run.finished and not run.usable
    assert "expected columns" in run.status() and str(path) in run.status()


def test_csv_in_another_format_names_the_file_and_the_expected_columns(fake):
    """A per-subject CSV of another format (e.g. the pre-HD95 ``subject,ET,TC,WT``) is one
    problem of its run, naming the file and every expected column; the run is not used."""
    path = fake.target(4, "imm")
    csv_path = path / "test_per_subject.csv"
    csv_path.write_text("subject,ET,TC,WT\nx,0.5,0.6,0.7\n")
    run = discover(fake.root).targets[0]
    assert run.finished and not run.usable and run.per_subject == {}
    assert run.problem == (
        f"{csv_path}: expected columns subject,{','.join(SCORE_COLUMNS)}, got subject,ET,TC,WT"
    )
    with pytest.raises(RunError, match="expected columns subject,dice_ET,"):
        read_per_subject(csv_path)


def test_summary_disagreeing_with_csv_is_warned(fake):
    path = fake.target(4, "imm")
    summary = json.loads((path / "test_summary.json").read_text())
    summary["dice"]["mean"] += 0.1
    (path / "test_summary.json").write_text(json.dumps(summary))
    run = discover(fake.root).targets[0]
    assert run.usable and any("the CSV is used" in w for w in run.warnings)


def test_folder_without_config_or_marker_is_not_a_run(fake):
    fake.target(4, "timm")
    (fake.root / "brats" / "p4" / "m2").mkdir()  # e.g. made by hand, nothing in it
    assert [r.init for r in discover(fake.root).targets] == ["timm"]


def test_the_full_portion_is_labelled_validation():
    from tmerge.report.runs import SINGLE, SWEEP
    from tmerge.report.tables import Row

    assert Row(100, SINGLE).label() == "100 % (validation)"
    assert Row(100, SWEEP, (0, 1)).label() == "100 % (validation), seeds 0,1"
    assert Row(8, SINGLE).label() == "8 %"


def test_table2_headers_name_the_hd95_definition_and_the_empty_region_rules(fake):
    """Each sub-table says how its numbers were scored, from the runs' ``metrics.*`` config: a
    config without it predates the keys (directed HD95, brats2018); runs that differ are
    'mixed', with their counts."""
    pooled = {"hd95": "pooled", "convention": "brats2018"}
    for init in ("none", "timm"):
        fake.target(4, init, metrics=pooled)
    index = discover(fake.root)
    text = table2_markdown(index, table_rows(index, [4]), INITS)
    assert "## Dice ET — empty regions: brats2018\n" in text
    assert "## HD95 WT (mm) — HD95 pooled (BraTS, medpy); empty regions: brats2018\n" in text
    assert "95th percentile of the border-to-border distances of both directions" in text
    fake.target(4, "imm")  # written before metrics.* existed
    fake.target(4, "m2", metrics={"hd95": "pooled", "convention": "brats2023"})
    index = discover(fake.root)
    text = table2_markdown(index, table_rows(index, [4]), INITS)
    assert (
        "## HD95 ET (mm) — HD95 mixed (directed max (MONAI): 1 run, pooled (BraTS, medpy): 3 runs); "
        "empty regions: mixed (brats2018: 3 runs, brats2023: 1 run)\n"
    ) in text
