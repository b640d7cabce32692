"""The seed-aware comparison: the hierarchical bootstrap on hand-checkable cases, and its section of
``stats.md`` against per-seed differences computed here from the fake CSVs."""

from __future__ import annotations

import csv
import statistics

import numpy as np
import pytest

from tmerge.report import stats
from tmerge.report.paired import compare_seeds, seed_aware_rows, seed_pairs
from tmerge.report.runs import SINGLE, SWEEP, discover
from tmerge.report.stats import bootstrap_mean_ci, hierarchical_bootstrap_ci
from tmerge.report.stats_page import few_seeds_note, seed_aware_markdown, stats_markdown
from tmerge.report.tables import Row, table_inits, table_rows

# ---- hierarchical_bootstrap_ci -------------------------------------------------------------


@pytest.mark.parametrize("sizes", [(40, 40, 40), (40, 38, 40)])
def test_identical_subjects_reduce_to_a_bootstrap_of_the_seed_means(sizes):
    seed_means = np.array([0.02, -0.01, 0.05])
    diffs = [np.full(n, m) for n, m in zip(sizes, seed_means, strict=True)]
    mean, lo, hi = hierarchical_bootstrap_ci(diffs, 2000, seed=5)
    # the documented seed draws, repeated here: the subject draws change nothing
    picks = np.random.default_rng(5).integers(0, 3, size=(2000, 3))
    expected = np.quantile(seed_means[picks].mean(axis=1), [0.025, 0.975])
    assert (lo, hi) == pytest.approx(tuple(expected), abs=1e-12)
    assert mean == pytest.approx(seed_means.mean())
    assert seed_means.min() - 1e-12 <= lo <= hi <= seed_means.max() + 1e-12  # float rounding only


def test_one_seed_with_identical_differences_has_a_zero_width_interval():
    mean, lo, hi = hierarchical_bootstrap_ci([np.full(40, 0.03)], 500, seed=0)
    assert lo == hi == pytest.approx(0.03) and mean == pytest.approx(0.03)


def test_deterministic_for_a_fixed_seed():
    rng = np.random.default_rng(1)
    diffs = [rng.normal(0.01 * k, 0.05, 40) for k in range(3)]
    a = hierarchical_bootstrap_ci(diffs, 1000, seed=7)
    assert hierarchical_bootstrap_ci(diffs, 1000, seed=7) == a
    assert hierarchical_bootstrap_ci(diffs, 1000, seed=8) != a


def test_large_subject_effects_whose_seed_means_disagree_in_sign_are_not_separable():
    rng = np.random.default_rng(2)
    # within each seed the effect is large and tight, but seed 1 reverses it
    diffs = [0.10 + 0.01 * rng.standard_normal(40), -0.10 + 0.01 * rng.standard_normal(40)]
    diffs.append(0.10 + 0.01 * rng.standard_normal(40))
    # one seed alone would look decisive
    lo0, _ = bootstrap_mean_ci(diffs[0], 2000, np.random.default_rng(0))
    assert lo0 > 0.09
    mean, lo, hi = hierarchical_bootstrap_ci(diffs, 4000, seed=0)
    assert lo < 0 < hi
    # all of seed 1 in a resample has chance 1/27 > 2.5 %: the lower end sits at its mean
    assert lo == pytest.approx(diffs[1].mean(), abs=0.01)
    assert mean == pytest.approx(statistics.fmean(float(d.mean()) for d in diffs))


def test_seeds_weigh_the_same_whatever_their_number_of_subjects():
    mean, lo, hi = hierarchical_bootstrap_ci([np.ones(10), np.zeros(30)], 1000, seed=0)
    assert mean == pytest.approx(0.5)  # not the pooled 10/40
    assert (lo, hi) == pytest.approx((0.0, 1.0))


def test_spread_matches_the_two_stage_variance():
    """With many seeds the resampled mean is near-normal, with variance
    (Var_ML(seed means) + mean_s Var_ML(subjects of s) / n_s) / S: the interval's width follows."""
    rng = np.random.default_rng(3)
    diffs = [rng.normal(rng.normal(0.0, 0.02), 0.05, 15) for _ in range(20)]
    means = np.array([d.mean() for d in diffs])
    within = np.mean([d.var() / d.size for d in diffs])
    sd = np.sqrt((means.var() + within) / len(diffs))
    _, lo, hi = hierarchical_bootstrap_ci(diffs, 20_000, seed=1)
    assert (hi - lo) == pytest.approx(2 * 1.959964 * sd, rel=0.06)


def test_chunks_do_not_change_the_result(monkeypatch):
    rng = np.random.default_rng(4)
    diffs = [rng.normal(0.0, 0.05, n) for n in (40, 37, 40)]
    whole = hierarchical_bootstrap_ci(diffs, 999, seed=2)
    monkeypatch.setattr(stats, "_MAX_DRAWS", 500)  # 4 resamples per chunk, the last one short
    assert hierarchical_bootstrap_ci(diffs, 999, seed=2) == pytest.approx(whole, abs=1e-15)


def test_hierarchical_bootstrap_rejects_bad_arguments():
    with pytest.raises(ValueError, match="at least one seed"):
        hierarchical_bootstrap_ci([], 10, 0)
    with pytest.raises(ValueError, match="seed #1 has no differences"):
        hierarchical_bootstrap_ci([[0.1], []], 10, 0)
    with pytest.raises(ValueError, match="non-finite"):
        hierarchical_bootstrap_ci([[0.1, float("nan")]], 10, 0)
    with pytest.raises(ValueError, match="n_boot"):
        hierarchical_bootstrap_ci([[0.1]], 0, 0)
    with pytest.raises(ValueError, match="level"):
        hierarchical_bootstrap_ci([[0.1]], 10, 0, level=1.0)


# ---- the seed-aware section of stats.md ------------------------------------------------------

# timm is best at every seed but seed 1, where it is worst by as much: only the other rungs of the
# ladder are consistent across seeds.
OFFSETS = {"none": 0.0, "m1": 0.04, "m2": 0.05, "imm": 0.10, "mean-timm": 0.12}
TIMM = {0: 0.20, 1: -0.10, 2: 0.20}


@pytest.fixture
def sweep(fake):
    for seed in (0, 1, 2):
        for init, offset in OFFSETS.items():
            if init == "mean-timm" and seed == 2:
                continue  # mean-timm's seed 2 never ran
            fake.target(8, init, seed, offset=offset)
        fake.target(8, "timm", seed, offset=TIMM[seed])
    fake.target(4, "timm", offset=0.03)  # a single-seed row: no seed-aware comparison
    fake.target(4, "none")
    return fake


def csv_scores(path):
    with open(path) as f:
        return {r["subject"]: float(r["dice_mean"]) for r in csv.DictReader(f)}


def seed_mean_diff(fake, seed, reference, other):
    """reference − other of one seed, paired by subject, from the CSVs without the report's code."""
    base = fake.root / "brats" / "p8" / f"seed{seed}"
    ref = csv_scores(base / reference / "test_per_subject.csv")
    oth = csv_scores(base / other / "test_per_subject.csv")
    return statistics.fmean(ref[s] - oth[s] for s in ref)


def table(text: str, section: str) -> dict[str, list[str]]:
    block = text.split(section)[1].split("\n## ")[0].split("\n### ")[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("| ") and not ln.startswith("| comparison")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines)}


def test_seed_pairs_read_the_ladder():
    inits = ["none", "m1", "m2", "imm", "mean-imm", "mean-timm", "timm"]
    pairs = seed_pairs(inits, "timm")
    assert pairs[:6] == [("timm", o) for o in inits if o != "timm"]
    assert pairs[6:] == [("imm", "m1"), ("imm", "m2"), ("imm", "none"), ("m1", "none"), ("m2", "none")]
    assert seed_pairs(["none", "imm"], "imm") == [("imm", "none")]  # no duplicate rung


def test_seed_aware_comparisons_match_the_csvs(sweep):
    index = discover(sweep.root)
    rows = table_rows(index, [4, 8])
    assert seed_aware_rows(rows) == [Row(8, SWEEP, (0, 1, 2))]
    inits = table_inits(index, ["none", "timm"])
    found = {
        (c.reference, c.other): c
        for c in compare_seeds(index, Row(8, SWEEP, (0, 1, 2)), inits, "timm", n_boot=500, seed=0)
    }
    for (ref, other), c in found.items():
        expected = [seed_mean_diff(sweep, s, ref, other) for s in c.seeds]
        assert c.seed_means == pytest.approx(expected, abs=1e-12)
        assert c.mean == pytest.approx(statistics.fmean(expected))
        assert c.n_pairs == (10,) * len(c.seeds)
    assert found[("timm", "mean-timm")].seeds == (0, 1) and found[("timm", "mean-timm")].left_out == (2,)
    # timm's sign flips at seed 1: not separable from noise, although each seed is clear-cut
    assert not found[("timm", "none")].separable
    assert found[("timm", "none")].verdict() == "not separable from noise"
    # the other rungs hold at every seed
    assert found[("imm", "m1")].separable and found[("imm", "m1")].verdict() == "imm better"
    assert found[("imm", "none")].ci[0] > 0
    assert found[("m2", "none")].separable


def test_stats_md_has_the_seed_aware_section(sweep):
    from tmerge.report import ReportConfig, run_report

    text = (
        run_report(ReportConfig(runs_dir=str(sweep.root), bootstrap=400, seed=1)) / "stats.md"
    ).read_text()
    seed_aware = text.split("## Seed-aware comparison (training variance included)\n")[1].split(
        "\n## Per-subject tests"
    )[0]
    assert few_seeds_note(3) in seed_aware
    assert (
        "3 seeds: the CI reflects only 3 draws of training randomness and of train/val subjects" in seed_aware
    )
    rows = table(seed_aware, "### 8 %, seeds 0,1,2\n")
    per_seed = [seed_mean_diff(sweep, s, "timm", "none") for s in (0, 1, 2)]
    assert rows["timm − none"][:4] == ["0 1 2", "10", ", ".join(f"{d:+.4f}" for d in per_seed), "2 / 3"]
    assert rows["timm − none"][4] == f"{statistics.fmean(per_seed):+.4f}"
    assert rows["timm − none"][-1] == "not separable from noise"
    assert rows["timm − mean-timm"][0] == "0 1 (not 2)"
    assert rows["imm − m1"][-1] == "imm better" and rows["m1 − none"][3] == "3 / 3"
    assert "No seed-aware comparison for 4 %" in seed_aware
    # the per-subject section follows, labelled as such
    assert "## Per-subject tests (ignore training variance)" in text
    assert "### 8 %, seeds 0,1,2\n" in text.split("## Per-subject tests")[1]


def test_without_a_sweep_the_section_says_so(fake):
    fake.target(4, "timm", offset=0.03)
    fake.target(4, "none")
    index = discover(fake.root)
    rows = table_rows(index, [4])
    assert seed_aware_rows(rows) == []
    text = stats_markdown({}, ["none", "timm"], "timm", n_boot=10, seed=0, min_pairs=6, seed_aware={})
    assert "No portion has a sweep over ≥ 2 seeds" in text
    text = seed_aware_markdown({}, n_boot=10, seed=0, other_rows=[Row(4, SINGLE)])
    assert "No seed-aware comparison for 4 %" in text


def test_few_seeds_note_counts_the_distinct_seed_sets():
    assert "3 seeds:" in few_seeds_note(3) and "10 distinct sets of seeds" in few_seeds_note(3)
    assert "2/3 of their variance" in few_seeds_note(3)
    assert few_seeds_note(1).startswith("1 seed: the CI reflects only 1 draw of")


# ---- minimal detectable differences on the statistics page -----------------------------------


def t_mde(sd: float, n: int) -> float:
    """(t_{0.975, n−1} + t_{0.8, n−1}) · sd / √n, computed here with scipy."""
    from scipy.stats import t

    return (t.ppf(0.975, n - 1) + t.ppf(0.8, n - 1)) * sd / n**0.5


def first_seeds(sd: float, target: float, halfwidth: bool) -> int:
    """The smallest n ≥ 2 whose t half-width (or MDE) is ≤ target, counting up."""
    from scipy.stats import t

    n = 2
    while (t.ppf(0.975, n - 1) * sd / n**0.5 if halfwidth else t_mde(sd, n)) > target:
        n += 1
    return n


def test_every_interval_carries_its_mde(sweep):
    from tmerge.report import ReportConfig, run_report

    out = run_report(ReportConfig(runs_dir=str(sweep.root), bootstrap=200, seed=1, target_difference=0.05))
    text = (out / "stats.md").read_text()
    seed_aware = text.split("## Seed-aware comparison (training variance included)\n")[1].split(
        "\n## Per-subject tests"
    )[0]
    assert "MDE: the minimal detectable difference" in seed_aware
    rows = table(seed_aware, "### 8 %, seeds 0,1,2\n")
    for name, ref, other in [("timm − none", "timm", "none"), ("imm − m1", "imm", "m1")]:
        per_seed = [seed_mean_diff(sweep, s, ref, other) for s in (0, 1, 2)]
        sd = statistics.stdev(per_seed)
        cells = rows[name]
        assert cells[-3] == f"{t_mde(sd, 3):.4f}"
        assert cells[-2] == f"{first_seeds(sd, 0.05, True)} / {first_seeds(sd, 0.05, False)}"
    # two seeds (0, 1): an MDE with 1 degree of freedom, far larger than with three
    per_seed = [seed_mean_diff(sweep, s, "timm", "mean-timm") for s in (0, 1)]
    assert rows["timm − mean-timm"][-3] == f"{t_mde(statistics.stdev(per_seed), 2):.4f}"

    # per subject, 4 %: the subjects' differences of the single-seed runs
    per_subject = text.split("## Per-subject tests (ignore training variance)\n")[1]
    section = per_subject.split("### 4 %\n")[1].split("\n### ")[0]
    line = next(ln for ln in section.splitlines() if ln.startswith("| none |"))
    ref = csv_scores(sweep.root / "brats" / "p4" / "timm" / "test_per_subject.csv")
    oth = csv_scores(sweep.root / "brats" / "p4" / "none" / "test_per_subject.csv")
    sd = statistics.stdev(ref[s] - oth[s] for s in ref)
    assert line.split("|")[6].strip() == f"{t_mde(sd, len(ref)):.4f}"

    # the CSV holds the same numbers
    lines = list(csv.DictReader((out / "stats.csv").read_text().splitlines()))
    timm_none = next(
        r for r in lines if r["analysis"] == "seed-aware" and (r["reference"], r["other"]) == ("timm", "none")
    )
    per_seed = [seed_mean_diff(sweep, s, "timm", "none") for s in (0, 1, 2)]
    assert timm_none["n"] == "3" and timm_none["seeds"] == "0 1 2"
    assert float(timm_none["sd"]) == pytest.approx(statistics.stdev(per_seed))
    assert float(timm_none["mde"]) == pytest.approx(t_mde(statistics.stdev(per_seed), 3))
    assert int(timm_none["seeds_for_mde"]) == first_seeds(statistics.stdev(per_seed), 0.05, False)
    p4 = next(r for r in lines if r["analysis"] == "per-subject" and r["portion"] == "4")
    assert float(p4["mde"]) == pytest.approx(t_mde(sd, len(ref)))
    assert p4["p"] != "" and p4["seeds_for_mde"] == ""
