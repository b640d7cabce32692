"""``tmerge report`` end to end on fake run folders: every file is written, missing and unfinished
runs are named, the statistics are reproducible, and bad input is one line with exit status 2."""

from __future__ import annotations

import csv

import matplotlib.image
import pytest

from tmerge.cli import main
from tmerge.report import ReportConfig, run_report

OUTPUTS = (
    "table2.md",
    "table2.csv",
    "endpoints.md",
    "endpoints.csv",
    "table3.md",
    "table4.md",
    "stats.md",
    "stats.csv",
    "fig3_examples.png",
    "fig4_paired.png",
    "fig5_alphas.png",
    "fig5_alpha_trajectory.png",
    "report.md",
)


@pytest.fixture
def runs(fake):
    fake.brats_data()
    for init in ("none", "m1", "m2", "imm"):
        fake.target(4, init, predictions=init != "m1")
    fake.target(4, "timm", offset=0.03, predictions=True)
    fake.target(8, "none")
    fake.target(8, "timm", offset=0.03, run_json=False)
    fake.target(8, "m2", finished=False)
    for seed in (0, 1):
        fake.target(8, "none", seed)
        fake.target(8, "timm", seed, offset=0.03)
    fake.source("task1")
    fake.source("task2", finished=False)
    return fake


def test_report_writes_every_file(runs):
    out = run_report(ReportConfig(runs_dir=str(runs.root), bootstrap=200))
    assert out == runs.root / "report"
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    for name in OUTPUTS:
        if name.endswith(".png"):
            height, width = matplotlib.image.imread(out / name).shape[:2]
            assert height > 200 and width > 400, name
    report = (out / "report.md").read_text()
    for name in OUTPUTS[:-1]:
        assert f"]({name})" in report, name
    # missing and unfinished runs are named, never filled in
    assert "`brats/p8/m1/`: missing" in report
    assert "`brats/p8/m2/`: unfinished (no test_summary.json)" in report
    assert "`brats/p100/timm/`: missing" in report
    assert "`brats/p8/seed1/m2/`: missing" in report  # expected inits at every seed of a sweep
    # provenance: commit (or "unknown" without run.json) and a link to each config
    assert "| `brats/p4/timm/` | finished | 10 | 0123456789 |" in report
    assert "| `brats/p8/timm/` | finished | 10 | unknown |" in report
    assert "[config.yaml](../brats/p4/timm/config.yaml)" in report
    assert "| `task2` | unfinished (no metrics.json) |" in report
    # the tumour example of p4 draws the four runs with predictions and says which had none
    assert "no predictions/ in m1" in report
    # the inline Table 2 names how its Dice were scored
    assert "### Table 2 — Dice, mean of ET, TC and WT (the paper's Table 2) — empty regions: brats2018" in report
    table = list(csv.DictReader((out / "table2.csv").read_text().splitlines()))
    assert {r["init"] for r in table if r["value"]} == {"none", "m1", "m2", "imm", "timm"}


def test_stats_are_reproducible_and_name_the_comparisons(runs):
    cfg = ReportConfig(runs_dir=str(runs.root), out_dir=str(runs.root / "a"), bootstrap=300, seed=3)
    first = (run_report(cfg) / "stats.md").read_text()
    cfg.out_dir = str(runs.root / "b")
    assert (run_report(cfg) / "stats.md").read_text() == first
    # the fake runs' configs predate metrics.*: their Dice were scored under the brats2018 rules
    assert "Dice scored with empty regions: brats2018 (Table 2 says what the rules mean)." in first
    per_subject = first.split("## Per-subject tests (ignore training variance)\n")[1]
    section = per_subject.split("### 4 %\n")[1].split("\n### ")[0]
    lines = {
        ln.split("|")[1].strip(): ln
        for ln in section.splitlines()
        if ln.startswith("| ") and "other" not in ln
    }
    assert set(lines) == {"none", "m1", "m2", "imm"}
    assert "| 10 |" in lines["m2"]
    sweep = per_subject.split("### 8 %, seeds 0,1\n")[1]
    assert "| none | 0 1 | 10 |" in sweep
    assert "Not compared (no finished run): m1, m2, imm, mean-imm, mean-timm." in sweep


def test_report_without_any_run_still_writes_every_file(tmp_path):
    (tmp_path / "runs").mkdir()
    out = run_report(ReportConfig(runs_dir=str(tmp_path / "runs")))
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    assert "`brats/p4/timm/`: missing" in (out / "report.md").read_text()


def test_cli_report_and_its_errors(runs, tmp_path, capsys):
    assert main(["report", f"runs_dir={runs.root}", "out=" + str(tmp_path / "r"), "bootstrap=50"]) == 0
    assert (tmp_path / "r" / "report.md").is_file()
    assert main(["report", f"runs_dir={tmp_path / 'nowhere'}"]) == 2
    assert "runs folder not found" in capsys.readouterr().err
    assert main(["report", f"runs_dir={runs.root}", "bootstrap=0"]) == 2
    assert "bootstrap" in capsys.readouterr().err
